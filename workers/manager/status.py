"""`flockserve status` / `tenant show`: the control plane's view plus Kafka lag per partition."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schema.tables import ACCEPTING_WORKER_STATES, LIVE_WORKER_STATES
from schema.topics import partition_for
from workers.config import Settings
from workers.manager import pg
from workers.manager.leader import current_leader
from workers.manager.routing import read_routes
from workers.manager.state import balancer_inputs, observe, partition_cost, report_for
from workers.kafka_conn import kafka_options


async def kafka_lag(s: Settings, partitions: list[int]) -> dict[int, dict[str, int | None]]:
    """End offset, committed offset (the shared consumer group) and lag per request partition."""
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **kafka_options(s), group_id=s.consumer_group, enable_auto_commit=False,
                         request_timeout_ms=10000)
    await c.start()
    try:
        tps = [TopicPartition(s.requests_topic, p) for p in partitions]
        ends = await c.end_offsets(tps)
        out = {}
        for tp in tps:
            committed = await c.committed(tp)
            end = ends.get(tp)
            out[tp.partition] = {"end": end, "committed": committed,
                                 "lag": None if end is None else end - (committed or 0)}
        return out
    finally:
        await c.stop()


async def gather_status(s: Settings, with_lag: bool = True) -> dict[str, Any]:
    async with pg.session(s.database_url, "flock-cli") as conn:
        obs = await observe(conn, s.requests_topic)
        leader = await current_leader(conn, s.requests_topic)
        routes = await read_routes(conn)
    lag: dict[int, dict] = {}
    if with_lag and obs.leases:
        try:
            lag = await asyncio.wait_for(kafka_lag(s, [l.partition for l in obs.leases]), 20)
        except Exception as exc:  # noqa: BLE001 - status without lag beats no status
            lag = {l.partition: {"lag": None, "error": f"{type(exc).__name__}: {exc}"} for l in obs.leases}
    _, parts = balancer_inputs(obs, s.pet_cost_weights, s.worker_timeout_s)
    cost = {p.partition: p.cost for p in parts}
    workers = []
    for w in obs.workers:
        m = w.metrics
        owned = sorted(int(p) for p in m.get("owned", {}))
        held = sorted(l.partition for l in obs.leases if l.worker_id == w.worker_id)
        workers.append({"worker_id": w.worker_id, "state": w.state, "mode": m.get("mode"), "device": w.device,
                        "capacity": w.capacity, "heartbeat_age_s": round(w.heartbeat_age_s, 1),
                        "partitions": held if w.follows_leases else owned,
                        "tokens_per_s": m.get("tokens_per_s"), "requests_per_s": m.get("requests_per_s"),
                        "load": round(sum(cost.get(p, 0.0) for p in held), 1),
                        "queue_depth": m.get("queue_depth"), "inflight": m.get("inflight"),
                        "resident_tenants": m.get("resident_count"), "free_adapter_bytes": m.get("free_adapter_bytes")})
    leases = [{"partition": l.partition, "worker_id": l.worker_id, "epoch": l.epoch, "state": l.state,
               "next_worker_id": l.next_worker_id,
               "expires_in_s": None if l.expires_in_s is None else round(l.expires_in_s, 1),
               "load": round(cost.get(l.partition, 0.0), 1), "hot_tenants": l.hot_tenants[:5],
               **{k: v for k, v in lag.get(l.partition, {}).items() if k in ("lag", "committed", "end")}}
              for l in obs.leases]
    return {"topic": s.requests_topic, "leader": leader, "workers": workers, "leases": leases, "routes": routes}


async def tenant_serving(s: Settings, tenant_id: str) -> dict[str, Any]:
    """Where a tenant is served: its partitions (hash home or spread route), their owners, and
    which workers report it resident."""
    async with pg.session(s.database_url, "flock-cli") as conn:
        obs = await observe(conn, s.requests_topic, with_pet_types=False)
        routes = await read_routes(conn)
    home = partition_for(tenant_id, s.request_partitions)
    parts = routes.get(tenant_id, [home])
    owner = {l.partition: l.worker_id for l in obs.leases}
    static = {int(p): w.worker_id for w in obs.workers if not w.follows_leases and w.state in ACCEPTING_WORKER_STATES
              for p in w.metrics.get("owned", {})}
    rows = []
    for p in parts:
        lease = next((l for l in obs.leases if l.partition == p), None)
        tok = partition_cost(report_for(obs, lease), {}, {})[1].get(tenant_id) if lease else None
        rows.append({"partition": p, "worker_id": owner.get(p) or static.get(p),
                     "tokens_per_s": None if tok is None else round(tok, 1)})
    resident = [w.worker_id for w in obs.workers if tenant_id in w.metrics.get("resident_tenants", [])
                and w.state in LIVE_WORKER_STATES]
    return {"home_partition": home, "spread": tenant_id in routes, "partitions": rows, "resident_on": resident}
