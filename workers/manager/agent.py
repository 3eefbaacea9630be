"""The control plane's hand inside a worker process.

- Registry: upserts the ``workers`` row every FLOCK_HEARTBEAT_S with a load report (rates from
  :mod:`workers.manager.rates`, queue depth, resident tenants, free adapter memory, device kind).
- Lease following (FLOCK_PARTITIONS=leases): every FLOCK_LEASE_POLL_S, or at once on NOTIFY,
  renews this worker's leases and hands the worker its current view; a lease renewed at local
  time t is trusted until t + FLOCK_LEASE_TIMEOUT_S (minus a margin), never longer.
- Hand-over: as target, prefetches the partition's hot tenants and then flips the lease to
  'releasing'; as source, drains + commits the partition and moves the lease to the target with
  epoch + 1 in one conditional UPDATE.

A database outage only logs: the data plane keeps serving until its leases lapse.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Callable, Protocol

from workers.config import Settings, follows_leases
from workers.manager import pg
from workers.manager.rates import LoadWindow

log = logging.getLogger("flock.agent")


class ServingWorker(Protocol):
    stopping: asyncio.Event
    owned: dict[int, int]

    def set_leases(self, leases: dict[int, tuple[int, float]]) -> None: ...
    async def release_partition(self, p: int) -> bool: ...
    def release_done(self, p: int) -> None: ...
    def prefetch(self, tenant_ids: list[str]) -> Any: ...
    def take_load(self) -> dict[str, Any]: ...


RENEW = """
UPDATE partition_leases SET expires_at = now() + make_interval(secs => $3)
WHERE topic = $1 AND worker_id = $2 AND state IN ('active', 'releasing')
RETURNING partition, epoch, state, next_worker_id"""

INCOMING = """
SELECT partition, epoch, hot_tenants FROM partition_leases
WHERE topic = $1 AND next_worker_id = $2 AND state = 'active'"""

READY_FOR_HANDOVER = """
UPDATE partition_leases SET state = 'releasing', updated_at = now()
WHERE topic = $1 AND partition = $2 AND epoch = $3 AND next_worker_id = $4 AND state = 'active'"""

# Source side, after drain + commit. Conditional on the epoch: a fenced source changes nothing.
TRANSFER = """
UPDATE partition_leases SET worker_id = next_worker_id, epoch = epoch + 1,
       state = CASE WHEN next_worker_id IS NULL THEN 'released' ELSE 'active' END,
       expires_at = CASE WHEN next_worker_id IS NULL THEN NULL ELSE now() + make_interval(secs => $5) END,
       assigned_at = now(), next_worker_id = NULL, handover_at = NULL, updated_at = now()
WHERE topic = $1 AND partition = $2 AND worker_id = $3 AND epoch = $4 AND state = 'releasing'"""

REGISTER = """
INSERT INTO workers (worker_id, host, device, capacity, state, heartbeat_at, started_at, metrics, topic,
                     follows_leases)
VALUES ($1, $2, $3, $4, $5, now(), now(), $6, $7, $8)
ON CONFLICT (worker_id) DO UPDATE SET
    host = EXCLUDED.host, device = EXCLUDED.device, capacity = EXCLUDED.capacity, heartbeat_at = now(),
    metrics = EXCLUDED.metrics, topic = EXCLUDED.topic, follows_leases = EXCLUDED.follows_leases,
    -- an operator's drain survives heartbeats; a restart ('starting') clears it
    state = CASE WHEN workers.state = 'draining' AND EXCLUDED.state = 'serving' THEN 'draining'
                 ELSE EXCLUDED.state END"""

GIVE_BACK = """
UPDATE partition_leases SET worker_id = NULL, state = 'released', epoch = epoch + 1, expires_at = NULL,
       next_worker_id = NULL, handover_at = NULL, updated_at = now()
WHERE topic = $1 AND worker_id = $2"""


class WorkerAgent:
    def __init__(self, s: Settings, worker: ServingWorker, engine_stats: Callable[[], dict] = dict):
        self.s = s
        self.worker = worker
        self.engine_stats = engine_stats
        self.follow = follows_leases(s.partitions)
        self.topic = s.requests_topic
        self.me = s.worker_id
        self.window = LoadWindow(s.rate_window_s)
        self._pool = None
        self._listener = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: dict[tuple[str, int], asyncio.Task] = {}  # ("release"|"prepare", partition)
        self._state = "starting"
        # Trust a renewal a little less than the manager does: clocks and round trips differ.
        self._margin = min(1.0, 0.2 * s.lease_timeout_s)

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                await self._connect()
                if time.monotonic() >= next_beat:
                    await self._heartbeat()
                    next_beat = time.monotonic() + self.s.heartbeat_s
                if self.follow:
                    await self._sync_leases()
            except pg.DB_ERRORS as exc:
                log.warning("control plane unreachable; serving on with the partitions held: %s", exc)
                await self._disconnect()
                if self.follow:
                    self._hold_through_outage()
            self._wake.clear()
            wait = self.s.lease_poll_s if self.follow else max(0.0, next_beat - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _hold_through_outage(self) -> None:
        """PostgreSQL is unreachable: nobody can move a lease now (every change goes through the
        database), so keep serving what is held rather than stall. When the database is back the
        next renewal tells which leases are still ours; the manager waits one lease timeout after
        regaining the database before it takes unrenewed leases back (manager.py)."""
        until = time.monotonic() + self.s.lease_timeout_s - self._margin
        held = {p: (epoch, until) for p, epoch in self.worker.owned.items()
                if ("release", p) not in self._tasks}
        self.worker.set_leases(held)

    async def stop(self, task: asyncio.Task | None = None) -> None:
        """After the worker's final commit: give leases back (no wait for expiry), mark stopped."""
        self._stop.set()
        self._wake.set()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        for t in list(self._tasks.values()):
            t.cancel()
        try:
            await self._connect()
            async with self._pool.acquire() as c:
                if self.follow:
                    await c.execute(GIVE_BACK, self.topic, self.me)
                    await c.execute("UPDATE partition_leases SET next_worker_id = NULL, handover_at = NULL "
                                    "WHERE topic = $1 AND next_worker_id = $2 AND state = 'active'", self.topic, self.me)
                    await pg.notify(c, self.topic)
                await c.execute("UPDATE workers SET state = 'stopped', heartbeat_at = now() WHERE worker_id = $1",
                                self.me)
        except pg.DB_ERRORS as exc:
            log.warning("could not give leases back (they expire in %.0fs): %s", self.s.lease_timeout_s, exc)
        await self._disconnect()

    async def _connect(self) -> None:
        if self._pool is None:
            self._pool = await pg.pool(self.s.database_url, f"flock-worker:{self.me}")
        if self.follow and self._listener is None:
            self._listener = await pg.connect(self.s.database_url, f"flock-worker-listen:{self.me}")
            await self._listener.add_listener(pg.LEASE_CHANNEL, self._notified)

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        if payload == self.topic:
            self._wake.set()

    async def _disconnect(self) -> None:
        for closer in (self._listener, self._pool):
            if closer is not None:
                try:
                    await asyncio.wait_for(closer.close(), 5)
                except Exception:  # noqa: BLE001 - already broken
                    pass
        self._listener = self._pool = None

    # ------------------------------------------------------------ registry
    async def _heartbeat(self) -> None:
        now = time.monotonic()
        load = self.worker.take_load()
        self.window.add(now, load["counts"], load["highwater"], list(load["owned"]))
        report = self.window.report(now)
        for p, lag in load["lag"].items():
            report["partitions"].setdefault(str(p), {})["lag"] = lag
        stats = self.engine_stats()
        resident = stats.pop("resident_tenants", [])
        report.update(queue_depth=load["queue_depth"], inflight=load["inflight"],
                      owned={str(p): e for p, e in load["owned"].items()}, releasing=load["releasing"],
                      resident_count=len(resident), resident_tenants=resident[:500],
                      mode="leases" if self.follow else "static", **stats)
        if self.worker.stopping.is_set():
            state = "draining"
        else:
            state, self._state = self._state, "serving"
        async with self._pool.acquire() as c:
            await c.execute(REGISTER, self.me, socket.gethostname(), self.s.device if self.s.device != "auto"
                            else stats.get("device_kind", "auto"), self.s.worker_capacity, state, report,
                            self.topic, self.follow)

    # ------------------------------------------------------------ leases
    async def _sync_leases(self) -> None:
        t0 = time.monotonic()
        async with self._pool.acquire() as c:
            rows = await c.fetch(RENEW, self.topic, self.me, self.s.lease_timeout_s)
            incoming = await c.fetch(INCOMING, self.topic, self.me)
        until = t0 + self.s.lease_timeout_s - self._margin
        leases = {}
        for r in rows:
            p = r["partition"]
            if r["state"] == "releasing" and ("release", p) not in self._tasks:
                self._spawn(("release", p), self._hand_over(p, r["epoch"]))
            if ("release", p) not in self._tasks:
                leases[p] = (r["epoch"], until)
        self.worker.set_leases(leases)
        for r in incoming:
            key = ("prepare", r["partition"])
            if key not in self._tasks:
                self._spawn(key, self._prepare(r["partition"], r["epoch"], list(r["hot_tenants"] or [])))

    async def _prepare(self, p: int, epoch: int, hot: list[str]) -> None:
        """Target side: warm the partition's hot tenants, then tell the source to let go."""
        if hot:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.worker.prefetch(hot)), self.s.handover_timeout_s / 2)
            except Exception as exc:  # noqa: BLE001 - a cold start is slower, not wrong
                log.warning("prefetch for partition %d failed: %s", p, exc)
        async with self._pool.acquire() as c:
            if await c.execute(READY_FOR_HANDOVER, self.topic, p, epoch, self.me) == "UPDATE 1":
                await pg.notify(c, self.topic)
                log.info("partition %d: %d hot tenants prefetched, asked its owner to hand over", p, len(hot))

    async def _hand_over(self, p: int, epoch: int) -> None:
        """Source side: drain and commit, then move the lease (epoch + 1) to the target."""
        try:
            t0 = time.monotonic()
            clean = await self.worker.release_partition(p)
            async with self._pool.acquire() as c:
                moved = await c.execute(TRANSFER, self.topic, p, self.me, epoch, self.s.lease_timeout_s)
                await pg.notify(c, self.topic)
            log.info("partition %d handed over (%s, drained+committed=%s) in %.0f ms", p,
                     "lease moved" if moved == "UPDATE 1" else "lease already gone", clean,
                     (time.monotonic() - t0) * 1e3)
        finally:
            self.worker.release_done(p)

    def _spawn(self, key: tuple[str, int], coro) -> None:
        async def guarded():
            try:
                await coro
            except pg.DB_ERRORS as exc:
                log.warning("%s of partition %d interrupted: %s", key[0], key[1], exc)
            finally:
                self._tasks.pop(key, None)
                self._wake.set()
        self._tasks[key] = asyncio.create_task(guarded())
