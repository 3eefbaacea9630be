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

from sqlalchemy import and_, bindparam, case, func, null, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from schema.tables import LeaseState, PartitionLease, Worker, WorkerState
from workers.config import Settings, follows_leases
from workers.db import async_engine
from workers.manager import pg
from workers.manager.rates import LoadWindow

log = logging.getLogger("flock.agent")

# Resident tenants a heartbeat names (most recently used first; the count is always exact): enough
# for the balancer's hot-tenant affinity, bounded however many adapters a worker holds.
RESIDENT_LISTED = 500


class ServingWorker(Protocol):
    stopping: asyncio.Event
    owned: dict[int, int]

    def set_leases(self, leases: dict[int, tuple[int, float]]) -> None: ...
    async def release_partition(self, p: int) -> bool: ...
    def release_done(self, p: int) -> None: ...
    def prefetch(self, tenant_ids: list[str]) -> Any: ...
    def take_load(self) -> dict[str, Any]: ...


L, W = PartitionLease.__table__, Worker.__table__
_MINE = (L.c.topic == bindparam("p_topic"), L.c.worker_id == bindparam("p_me"))

RENEW = (update(L).where(*_MINE, L.c.state.in_([LeaseState.ACTIVE, LeaseState.RELEASING]))
         .values(expires_at=func.now() + pg.secs("p_ttl"))
         .returning(L.c.partition, L.c.epoch, L.c.state, L.c.next_worker_id, L.c.hot_tenants))

_INCOMING = (L.c.topic == bindparam("p_topic"), L.c.next_worker_id == bindparam("p_me"),
             L.c.state == LeaseState.ACTIVE)
INCOMING = select(L.c.partition, L.c.epoch, L.c.hot_tenants).where(*_INCOMING)

READY_FOR_HANDOVER = (update(L).where(*_INCOMING, L.c.partition == bindparam("p_partition"),
                                      L.c.epoch == bindparam("p_epoch"))
                      .values(state=LeaseState.RELEASING))

# Source side, after drain + commit. Conditional on the epoch: a fenced source changes nothing.
_to_nobody = L.c.next_worker_id.is_(None)
TRANSFER = (update(L).where(*_MINE, L.c.partition == bindparam("p_partition"), L.c.epoch == bindparam("p_epoch"),
                            L.c.state == LeaseState.RELEASING)
            .values(worker_id=L.c.next_worker_id, epoch=L.c.epoch + 1,
                    state=case((_to_nobody, LeaseState.RELEASED.value), else_=LeaseState.ACTIVE.value),
                    expires_at=case((_to_nobody, null()), else_=func.now() + pg.secs("p_ttl")),
                    assigned_at=func.now(), next_worker_id=None, handover_at=None))

_reg = pg_insert(W).values(worker_id=bindparam("p_me"), host=bindparam("p_host"), device=bindparam("p_device"),
                           capacity=bindparam("p_capacity"), state=bindparam("p_state"), heartbeat_at=func.now(),
                           started_at=func.now(), metrics=bindparam("p_metrics", type_=W.c.metrics.type),
                           topic=bindparam("p_topic"), follows_leases=bindparam("p_follows"))
REGISTER = _reg.on_conflict_do_update(index_elements=[W.c.worker_id], set_={
    **{c: _reg.excluded[c] for c in ("host", "device", "capacity", "metrics", "topic", "follows_leases")},
    "heartbeat_at": func.now(),
    # an operator's drain survives heartbeats; a restart ('starting') clears it
    "state": case((and_(W.c.state == WorkerState.DRAINING, _reg.excluded.state == WorkerState.SERVING),
                   WorkerState.DRAINING.value), else_=_reg.excluded.state)})

GIVE_BACK = (update(L).where(*_MINE)
             .values(worker_id=None, state=LeaseState.RELEASED, epoch=L.c.epoch + 1, expires_at=None,
                     next_worker_id=None, handover_at=None))
CANCEL_INCOMING = update(L).where(*_INCOMING).values(next_worker_id=None, handover_at=None)
STOPPED = (update(W).where(W.c.worker_id == bindparam("p_me"))
           .values(state=WorkerState.STOPPED, heartbeat_at=func.now()))


class WorkerAgent:
    def __init__(self, s: Settings, worker: ServingWorker, engine_stats: Callable[[], dict] = dict,
                 capacity: float | None = None):
        self.s = s
        # registered as workers.capacity: measured at start (serving/capacity.py), else the setting
        self.capacity = capacity if capacity is not None else (s.worker_capacity or 1.0)
        self.worker = worker
        self.engine_stats = engine_stats
        self.follow = follows_leases(s.partitions)
        self.topic = s.requests_topic
        self.me = s.worker_id
        self._me = {"p_topic": self.topic, "p_me": self.me}  # the parameters every statement here names
        self.window = LoadWindow(s.rate_window_s)
        self._db: AsyncEngine | None = None
        self._listener = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: dict[tuple[str, int], asyncio.Task] = {}  # ("release"|"prepare", partition)
        self._state = WorkerState.STARTING
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
            except Exception:  # noqa: BLE001 - a failed beat is logged and retried, never the end of the agent
                log.exception("control-plane round failed; retrying")
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
            async with self._db.connect() as c:
                if self.follow:
                    await c.execute(GIVE_BACK, self._me)
                    await c.execute(CANCEL_INCOMING, self._me)
                    await pg.notify(c, self.topic)
                await c.execute(STOPPED, self._me)
        except pg.DB_ERRORS as exc:
            log.warning("could not give leases back (they expire in %.0fs): %s", self.s.lease_timeout_s, exc)
        await self._disconnect()

    async def _connect(self) -> None:
        if self._db is None:
            self._db = async_engine(self.s.database_url, f"flock-worker:{self.me}", pool_size=3)
        if self.follow and self._listener is None:
            self._listener = await pg.connect(self.s.database_url, f"flock-worker-listen:{self.me}")
            await self._listener.add_listener(pg.LEASE_CHANNEL, self._notified)

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        if payload == self.topic:
            self._wake.set()

    async def _disconnect(self) -> None:
        for close in (self._listener and self._listener.close, self._db and self._db.dispose):
            if close is not None:
                try:
                    await asyncio.wait_for(close(), 5)
                except Exception:  # noqa: BLE001 - already broken
                    pass
        self._listener = self._db = None

    # ------------------------------------------------------------ registry
    def load_report(self, now: float) -> dict[str, Any]:
        """The heartbeat's metrics: rates with top-K tenants per partition, gauges, engine stats.
        Its size depends on partitions and the caps here, not on how many tenants there are."""
        load = self.worker.take_load()
        self.window.add(now, load["counts"], load["highwater"], list(load["owned"]))
        report = self.window.report(now)
        for p, lag in load["lag"].items():
            report["partitions"].setdefault(str(p), {})["lag"] = lag
        stats = self.engine_stats()
        resident = stats.pop("resident_tenants", [])
        count = stats.pop("resident_count", len(resident))
        report.update(queue_depth=load["queue_depth"], inflight=load["inflight"],
                      owned={str(p): e for p, e in load["owned"].items()}, releasing=load["releasing"],
                      resident_count=count, resident_tenants=resident[:RESIDENT_LISTED],
                      mode="leases" if self.follow else "static", **stats)
        return report

    async def _heartbeat(self) -> None:
        report = self.load_report(time.monotonic())
        if self.worker.stopping.is_set():
            state = WorkerState.DRAINING
        else:
            state, self._state = self._state, WorkerState.SERVING
        async with self._db.connect() as c:
            await c.execute(REGISTER, {**self._me, "p_host": socket.gethostname(),
                                       "p_device": self.s.device if self.s.device != "auto"
                                       else report.get("device_kind", "auto"),
                                       "p_capacity": self.capacity, "p_state": state, "p_metrics": report,
                                       "p_follows": self.follow})

    # ------------------------------------------------------------ leases
    async def _sync_leases(self) -> None:
        t0 = time.monotonic()
        async with self._db.connect() as c:
            rows = (await c.execute(RENEW, {**self._me, "p_ttl": self.s.lease_timeout_s})).all()
            incoming = (await c.execute(INCOMING, self._me)).all()
        until = t0 + self.s.lease_timeout_s - self._margin
        leases = {}
        held = self.worker.owned
        for r in rows:
            p = r.partition
            if p not in held and r.hot_tenants and ("prepare", p) not in self._tasks:
                # Placed on us (its owner died, or first start): warm its hot tenants while we
                # start consuming it; a warm hand-over already prefetched in _prepare.
                self.worker.prefetch(list(r.hot_tenants))
                log.info("partition %d placed here: prefetching its %d hot tenants", p, len(r.hot_tenants))
            if r.state == LeaseState.RELEASING and ("release", p) not in self._tasks:
                self._spawn(("release", p), self._hand_over(p, r.epoch))
            if ("release", p) not in self._tasks:
                leases[p] = (r.epoch, until)
        self.worker.set_leases(leases)
        for r in incoming:
            key = ("prepare", r.partition)
            if key not in self._tasks:
                self._spawn(key, self._prepare(r.partition, r.epoch, list(r.hot_tenants or [])))

    async def _prepare(self, p: int, epoch: int, hot: list[str]) -> None:
        """Target side: warm the partition's hot tenants, then tell the source to let go."""
        if hot:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.worker.prefetch(hot)), self.s.handover_timeout_s / 2)
            except Exception as exc:  # noqa: BLE001 - a cold start is slower, not wrong
                log.warning("prefetch for partition %d failed: %s", p, exc)
        async with self._db.connect() as c:
            ready = await c.execute(READY_FOR_HANDOVER, {**self._me, "p_partition": p, "p_epoch": epoch})
            if ready.rowcount == 1:
                await pg.notify(c, self.topic)
                log.info("partition %d: %d hot tenants prefetched, asked its owner to hand over", p, len(hot))

    async def _hand_over(self, p: int, epoch: int) -> None:
        """Source side: drain and commit, then move the lease (epoch + 1) to the target."""
        try:
            t0 = time.monotonic()
            clean = await self.worker.release_partition(p)
            async with self._db.connect() as c:
                moved = await c.execute(TRANSFER, {**self._me, "p_partition": p, "p_epoch": epoch,
                                                   "p_ttl": self.s.lease_timeout_s})
                await pg.notify(c, self.topic)
            log.info("partition %d handed over (%s, drained+committed=%s) in %.0f ms", p,
                     "lease moved" if moved.rowcount == 1 else "lease already gone", clean,
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
