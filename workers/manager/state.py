"""What the control plane observes, read from PostgreSQL: workers with their load reports,
leases, PET types; and the translation of that into the balancer's inputs (measured cost)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, and_, bindparam, cast, extract, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from schema.tables import (ACCEPTING_WORKER_STATES, LIVE_WORKER_STATES, Adapter, LeaseState, PartitionLease, Tenant,
                           Worker)
from workers.manager.balancer import PartitionLoad, WorkerLoad


@dataclass
class WorkerRow:
    worker_id: str
    host: str
    device: str
    capacity: float
    state: str
    heartbeat_age_s: float
    follows_leases: bool
    metrics: dict[str, Any]
    topic: str | None


@dataclass
class LeaseRow:
    partition: int
    worker_id: str | None
    epoch: int
    state: str
    next_worker_id: str | None
    expires_in_s: float | None
    dwell_s: float | None
    hot_tenants: list[str] = field(default_factory=list)


@dataclass
class Observed:
    topic: str
    workers: list[WorkerRow]
    leases: list[LeaseRow]
    pet_types: dict[str, str]

    def worker(self, worker_id: str | None) -> WorkerRow | None:
        return next((w for w in self.workers if w.worker_id == worker_id), None)


def _seconds(interval: ColumnElement) -> ColumnElement:
    """An interval as float seconds."""
    return cast(extract("epoch", interval), Float)


W, L, T, A = Worker.__table__, PartitionLease.__table__, Tenant.__table__, Adapter.__table__

WORKERS = (select(W.c.worker_id, W.c.host, W.c.device, W.c.capacity, W.c.state, W.c.follows_leases, W.c.metrics,
                  W.c.topic, _seconds(func.now() - W.c.heartbeat_at).label("heartbeat_age_s"))
           .where(W.c.topic == bindparam("p_topic")).order_by(W.c.worker_id))

LEASES = (select(L.c.partition, L.c.worker_id, L.c.epoch, L.c.state, L.c.next_worker_id, L.c.hot_tenants,
                 _seconds(L.c.expires_at - func.now()).label("expires_in_s"),
                 _seconds(func.now() - L.c.assigned_at).label("dwell_s"))
          .where(L.c.topic == bindparam("p_topic")).order_by(L.c.partition))

# Only the tenants asked about (the reports' heavy hitters, a few routes): never every tenant.
PET_TYPES = (select(T.c.tenant_id, A.c.pet_type)
             .join_from(T, A, and_(A.c.tenant_id == T.c.tenant_id, A.c.version == T.c.active_version))
             .where(T.c.tenant_id == func.any(bindparam("p_ids", type_=ARRAY(T.c.tenant_id.type)))))


async def pet_types_of(conn: AsyncConnection, tenant_ids) -> dict[str, str]:
    """tenant -> PET type of its active adapter, for the existing tenants among ``tenant_ids``."""
    ids = sorted(set(tenant_ids))
    return {r.tenant_id: r.pet_type for r in await conn.execute(PET_TYPES, {"p_ids": ids})} if ids else {}


def reported_tenants(workers: list[WorkerRow]) -> set[str]:
    """Tenants named in the load reports (top-K per partition): bounded by partitions x K."""
    return {t for w in workers for rep in w.metrics.get("partitions", {}).values() for t in rep.get("tenants", {})}


async def observe(conn: AsyncConnection, topic: str, with_pet_types: bool = True) -> Observed:
    workers = [WorkerRow(**r._mapping) for r in await conn.execute(WORKERS, {"p_topic": topic})]
    leases = [LeaseRow(**{**r._mapping, "hot_tenants": list(r.hot_tenants or [])})
              for r in await conn.execute(LEASES, {"p_topic": topic})]
    pets = await pet_types_of(conn, reported_tenants(workers)) if with_pet_types else {}
    return Observed(topic, workers, leases, pets)


def report_for(obs: Observed, lease: LeaseRow) -> dict[str, Any] | None:
    """The partition's freshest load report: its owner's, else whoever reported it last."""
    key = str(lease.partition)
    owner = obs.worker(lease.worker_id)
    if owner and key in owner.metrics.get("partitions", {}):
        return owner.metrics["partitions"][key]
    others = [w for w in obs.workers if key in w.metrics.get("partitions", {})]
    if not others:
        return None
    return min(others, key=lambda w: w.heartbeat_age_s).metrics["partitions"][key]


def partition_cost(report: dict[str, Any] | None, pet_types: dict[str, str],
                   weights: dict[str, float], arrivals: float | None = None,
                   tokens_per_request: float | None = None) -> tuple[float, dict[str, float]]:
    """(weighted tokens/s of the partition, weighted tokens/s per reported tenant).

    A partition whose requests arrive faster than they are served (lag grows) costs its demand,
    not its throughput: otherwise a saturated worker would look no busier than its capacity.
    ``arrivals`` (requests/s, measured from end offsets) overrides the worker's own estimate;
    with no served traffic to scale, demand x ``tokens_per_request`` is the cost."""
    report = report or {}
    tenants = {t: k * weights.get(pet_types.get(t, ""), 1.0) for t, k in report.get("tenants", {}).items()}
    tail = max(0.0, report.get("tokens_per_s", 0.0) - sum(report.get("tenants", {}).values()))
    cost = sum(tenants.values()) + tail
    served = report.get("requests_per_s") or 0.0
    arriving = arrivals if arrivals is not None else (report.get("arrivals_per_s") or 0.0)
    if served > 0 and (arriving > 1.05 * served or (arrivals is not None and arriving < 0.95 * served)):
        scale = arriving / served
        cost *= scale
        tenants = {t: c * scale for t, c in tenants.items()}
    elif served <= 0 and arriving > 0 and tokens_per_request:
        cost = arriving * tokens_per_request
    return cost, tenants


def tokens_per_request(obs: Observed) -> float | None:
    tok = sum(w.metrics.get("tokens_per_s", 0.0) for w in obs.workers if w.state in LIVE_WORKER_STATES)
    req = sum(w.metrics.get("requests_per_s", 0.0) for w in obs.workers if w.state in LIVE_WORKER_STATES)
    return tok / req if req > 0 else None


def accepting(w: WorkerRow, worker_timeout_s: float) -> bool:
    return w.follows_leases and w.state in ACCEPTING_WORKER_STATES and w.heartbeat_age_s <= worker_timeout_s


def balancer_inputs(obs: Observed, weights: dict[str, float], worker_timeout_s: float,
                    hot_cover: float = 0.8, hot_max: int = 16,
                    arrivals: dict[int, float] | None = None) -> tuple[list[WorkerLoad], list[PartitionLoad]]:
    workers = [WorkerLoad(w.worker_id, w.capacity, accepting(w, worker_timeout_s),
                          frozenset(w.metrics.get("resident_tenants", [])))
               for w in obs.workers if w.follows_leases and w.state in LIVE_WORKER_STATES]
    parts = []
    tpr = tokens_per_request(obs)
    for lease in obs.leases:
        cost, tenants = partition_cost(report_for(obs, lease), obs.pet_types, weights,
                                       (arrivals or {}).get(lease.partition), tpr)
        hot, covered = [], 0.0
        for t, c in sorted(tenants.items(), key=lambda kv: -kv[1]):
            if covered >= hot_cover * cost or len(hot) >= hot_max:
                break
            hot.append(t)
            covered += c
        parts.append(PartitionLoad(lease.partition, lease.worker_id if lease.state != LeaseState.RELEASED else None, cost,
                                   tuple(hot), lease.dwell_s if lease.dwell_s is not None else float("inf"),
                                   moving=lease.next_worker_id is not None or lease.state == LeaseState.RELEASING))
    return workers, parts


def tenant_costs(obs: Observed, weights: dict[str, float],
                 arrivals: dict[int, float] | None = None) -> dict[str, float]:
    """Weighted tokens/s per tenant summed over partitions (a spread tenant sits on several)."""
    out: dict[str, float] = {}
    for lease in obs.leases:
        for t, c in partition_cost(report_for(obs, lease), obs.pet_types, weights,
                                   (arrivals or {}).get(lease.partition))[1].items():
            out[t] = out.get(t, 0.0) + c
    return out
