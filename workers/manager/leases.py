"""Lease-table operations of the manager (and of the CLI's drain/rebalance). Every change is
one conditional UPDATE, so a stale manager or a raced worker changes nothing.

Statements are built once from schema/tables.py with named parameters (``p_*``)."""

from __future__ import annotations

from sqlalchemy import Integer, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schema.tables import (ACCEPTING_WORKER_STATES, LIVE_WORKER_STATES, AuditEvent, LeaseState, PartitionLease,
                           Worker, WorkerState)
from workers.manager.pg import secs

L = PartitionLease.__table__
W = Worker.__table__
A = AuditEvent.__table__

TOPIC = L.c.topic == bindparam("p_topic")

_parts = func.generate_series(0, bindparam("p_n", type_=Integer) - 1).column_valued("g")
ENSURE = pg_insert(L).from_select(
    ["topic", "partition", "state", "epoch"],
    select(bindparam("p_topic", type_=L.c.topic.type), _parts, literal(LeaseState.RELEASED.value), literal(0)),
).on_conflict_do_nothing()

MARK_DEAD = (update(W).where(W.c.topic == bindparam("p_topic"), W.c.state.in_(LIVE_WORKER_STATES),
                             W.c.heartbeat_at < func.now() - secs("p_timeout"))
             .values(state=WorkerState.DEAD).returning(W.c.worker_id))

# Lapsed leases and leases of dead/stopped workers go back to the pool; epoch + 1 fences the old owner.
_gone = (select(L.c.partition, L.c.worker_id)
         .where(TOPIC, L.c.worker_id.is_not(None),
                or_(L.c.expires_at < func.now(),
                    L.c.worker_id.in_(select(W.c.worker_id).where(W.c.state.in_([WorkerState.DEAD,
                                                                                  WorkerState.STOPPED])))))
         .with_for_update().cte("gone"))
EXPIRE = (update(L).where(TOPIC, L.c.partition == _gone.c.partition)
          .values(worker_id=None, state=LeaseState.RELEASED, epoch=L.c.epoch + 1, expires_at=None,
                  next_worker_id=None, handover_at=None)
          .returning(_gone.c.partition, _gone.c.worker_id))

# The target never got ready (dead, or prefetch stuck): call the hand-over off.
CANCEL_STALE = (update(L).where(TOPIC, L.c.state == LeaseState.ACTIVE, L.c.next_worker_id.is_not(None),
                                or_(L.c.handover_at < func.now() - secs("p_timeout"),
                                    L.c.next_worker_id.not_in(select(W.c.worker_id)
                                                              .where(W.c.state.in_(ACCEPTING_WORKER_STATES)))))
                .values(next_worker_id=None, handover_at=None).returning(L.c.partition))

# The source never let go: move the lease anyway. Its epoch is now stale, so it stops
# committing; what it did not commit is replayed by the target (duplicates, never loss).
FORCE_STALE = (update(L).where(TOPIC, L.c.state == LeaseState.RELEASING, L.c.next_worker_id.is_not(None),
                               L.c.handover_at < func.now() - secs("p_timeout"))
               .values(worker_id=L.c.next_worker_id, epoch=L.c.epoch + 1, state=LeaseState.ACTIVE,
                       expires_at=func.now() + secs("p_ttl"), assigned_at=func.now(), next_worker_id=None,
                       handover_at=None)
               .returning(L.c.partition, L.c.worker_id))

# Placing an unowned partition (first start, or after its owner died) names its last known hot
# tenants so the new owner prefetches them while it starts consuming.
ASSIGN = (update(L).where(TOPIC, L.c.partition == bindparam("p_partition"), L.c.worker_id.is_(None))
          .values(worker_id=bindparam("p_worker"), epoch=L.c.epoch + 1, state=LeaseState.ACTIVE,
                  expires_at=func.now() + secs("p_ttl"), assigned_at=func.now(), next_worker_id=None,
                  handover_at=None, hot_tenants=bindparam("p_hot", type_=JSONB)))

REQUEST_HANDOVER = (update(L).where(TOPIC, L.c.partition == bindparam("p_partition"),
                                    L.c.worker_id == bindparam("p_source"), L.c.state == LeaseState.ACTIVE,
                                    L.c.next_worker_id.is_(None))
                    .values(next_worker_id=bindparam("p_target"), handover_at=func.now(),
                            hot_tenants=bindparam("p_hot", type_=JSONB)))

SET_STATE = (update(W).where(W.c.worker_id == bindparam("p_worker")).values(state=bindparam("p_state"))
             .returning(W.c.worker_id))

AUDIT = insert(A)


async def ensure_partitions(conn: AsyncConnection, topic: str, n: int) -> None:
    await conn.execute(ENSURE, {"p_topic": topic, "p_n": n})


async def mark_dead(conn: AsyncConnection, topic: str, timeout_s: float) -> list[str]:
    return list((await conn.execute(MARK_DEAD, {"p_topic": topic, "p_timeout": timeout_s})).scalars())


async def expire(conn: AsyncConnection, topic: str) -> list[tuple[int, str]]:
    return [(r.partition, r.worker_id) for r in await conn.execute(EXPIRE, {"p_topic": topic})]


async def settle_handovers(conn: AsyncConnection, topic: str, timeout_s: float,
                           lease_timeout_s: float) -> tuple[list[int], list[int]]:
    cancelled = list((await conn.execute(CANCEL_STALE, {"p_topic": topic, "p_timeout": timeout_s})).scalars())
    forced = [r.partition for r in await conn.execute(FORCE_STALE, {"p_topic": topic, "p_timeout": timeout_s,
                                                                    "p_ttl": lease_timeout_s})]
    return cancelled, forced


async def assign(conn: AsyncConnection, topic: str, partition: int, worker_id: str, lease_timeout_s: float,
                 hot: list[str] = ()) -> bool:
    res = await conn.execute(ASSIGN, {"p_topic": topic, "p_partition": partition, "p_worker": worker_id,
                                      "p_ttl": lease_timeout_s, "p_hot": list(hot)})
    return res.rowcount == 1


async def request_handover(conn: AsyncConnection, topic: str, partition: int, source: str, target: str,
                           hot: list[str]) -> bool:
    res = await conn.execute(REQUEST_HANDOVER, {"p_topic": topic, "p_partition": partition, "p_source": source,
                                                "p_target": target, "p_hot": list(hot)})
    return res.rowcount == 1


async def set_worker_state(conn: AsyncConnection, worker_id: str, state: WorkerState) -> bool:
    return (await conn.execute(SET_STATE, {"p_worker": worker_id, "p_state": state})).first() is not None


async def audit(conn: AsyncConnection, kind: str, subject: str, detail: dict) -> None:
    await conn.execute(AUDIT, {"kind": kind, "subject": subject, "detail": detail})
