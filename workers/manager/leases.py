"""Lease-table operations of the manager (and of the CLI's drain/rebalance). Every change is
one conditional UPDATE, so a stale manager or a raced worker changes nothing."""

from __future__ import annotations

ENSURE = """
INSERT INTO partition_leases (topic, partition, state, epoch)
SELECT $1, g, 'released', 0 FROM generate_series(0, $2 - 1) AS g
ON CONFLICT DO NOTHING"""

MARK_DEAD = """
UPDATE workers SET state = 'dead'
WHERE topic = $1 AND state IN ('starting', 'serving', 'draining')
  AND heartbeat_at < now() - make_interval(secs => $2)
RETURNING worker_id"""

# Lapsed leases and leases of dead/stopped workers go back to the pool; epoch + 1 fences the old owner.
EXPIRE = """
WITH gone AS (
    SELECT l.partition, l.worker_id FROM partition_leases l
    WHERE l.topic = $1 AND l.worker_id IS NOT NULL
      AND (l.expires_at < now()
           OR l.worker_id IN (SELECT worker_id FROM workers WHERE state IN ('dead', 'stopped')))
    FOR UPDATE)
UPDATE partition_leases l SET worker_id = NULL, state = 'released', epoch = l.epoch + 1, expires_at = NULL,
       next_worker_id = NULL, handover_at = NULL, updated_at = now()
FROM gone WHERE l.topic = $1 AND l.partition = gone.partition
RETURNING gone.partition, gone.worker_id"""

# The target never got ready (dead, or prefetch stuck): call the hand-over off.
CANCEL_STALE = """
UPDATE partition_leases SET next_worker_id = NULL, handover_at = NULL, updated_at = now()
WHERE topic = $1 AND state = 'active' AND next_worker_id IS NOT NULL
  AND (handover_at < now() - make_interval(secs => $2)
       OR next_worker_id NOT IN (SELECT worker_id FROM workers WHERE state IN ('starting', 'serving')))
RETURNING partition"""

# The source never let go: move the lease anyway. Its epoch is now stale, so it stops
# committing; what it did not commit is replayed by the target (duplicates, never loss).
FORCE_STALE = """
UPDATE partition_leases SET worker_id = next_worker_id, epoch = epoch + 1, state = 'active',
       expires_at = now() + make_interval(secs => $3), assigned_at = now(), next_worker_id = NULL,
       handover_at = NULL, updated_at = now()
WHERE topic = $1 AND state = 'releasing' AND next_worker_id IS NOT NULL
  AND handover_at < now() - make_interval(secs => $2)
RETURNING partition, worker_id"""

ASSIGN = """
UPDATE partition_leases SET worker_id = $3, epoch = epoch + 1, state = 'active',
       expires_at = now() + make_interval(secs => $4), assigned_at = now(), next_worker_id = NULL,
       handover_at = NULL, updated_at = now()
WHERE topic = $1 AND partition = $2 AND worker_id IS NULL"""

REQUEST_HANDOVER = """
UPDATE partition_leases SET next_worker_id = $4, handover_at = now(), hot_tenants = $5, updated_at = now()
WHERE topic = $1 AND partition = $2 AND worker_id = $3 AND state = 'active' AND next_worker_id IS NULL"""

SET_STATE = "UPDATE workers SET state = $2 WHERE worker_id = $1 RETURNING worker_id"

AUDIT = "INSERT INTO audit_events (kind, subject, detail) VALUES ($1, $2, $3)"


async def ensure_partitions(conn, topic: str, n: int) -> None:
    await conn.execute(ENSURE, topic, n)


async def mark_dead(conn, topic: str, timeout_s: float) -> list[str]:
    return [r["worker_id"] for r in await conn.fetch(MARK_DEAD, topic, timeout_s)]


async def expire(conn, topic: str) -> list[tuple[int, str]]:
    return [(r["partition"], r["worker_id"]) for r in await conn.fetch(EXPIRE, topic)]


async def settle_handovers(conn, topic: str, timeout_s: float, lease_timeout_s: float) -> tuple[list[int], list[int]]:
    cancelled = [r["partition"] for r in await conn.fetch(CANCEL_STALE, topic, timeout_s)]
    forced = [r["partition"] for r in await conn.fetch(FORCE_STALE, topic, timeout_s, lease_timeout_s)]
    return cancelled, forced


async def assign(conn, topic: str, partition: int, worker_id: str, lease_timeout_s: float) -> bool:
    return await conn.execute(ASSIGN, topic, partition, worker_id, lease_timeout_s) == "UPDATE 1"


async def request_handover(conn, topic: str, partition: int, source: str, target: str, hot: list[str]) -> bool:
    return await conn.execute(REQUEST_HANDOVER, topic, partition, source, target, list(hot)) == "UPDATE 1"


async def set_worker_state(conn, worker_id: str, state: str) -> bool:
    return bool(await conn.fetch(SET_STATE, worker_id, state))


async def audit(conn, kind: str, subject: str, detail: dict) -> None:
    await conn.execute(AUDIT, kind, subject, detail)
