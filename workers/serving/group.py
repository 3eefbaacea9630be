"""A worker as a group of processes: one engine process (this one: the engine and its adapter
pool, the control-plane agent, the HTTP endpoint) and N edge processes running the Kafka loop
(workers.serving.edge), each for a share of the worker's partitions (``edge_of``).

The manager sees one worker: the agent here renews the group's leases and this class routes
each partition's lease view and hand-over calls to the edge that consumes it. Batches arrive
packed in each edge's shared-memory slots with one small frame each; the engine host merges the
queued batches of several edges into one forward pass, taking one batch per edge in turn
(round-robin, so a busy edge cannot starve the others), and sends each edge its results back as
arrays. An edge that dies is restarted (its unacknowledged offsets are replayed by Kafka); if
this process dies the edges die with it (PR_SET_PDEATHSIG) and the group is restarted whole.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from time import thread_time
from typing import Any

import numpy as np

from workers.config import Settings
from workers.serving.ipc import SlotLayout, SlotRing, encode_outputs, read_frame, write_frame
from workers.serving.versions import follow_active_versions
from workers.serving.metrics import WorkerMetrics

log = logging.getLogger("flock.group")


def edge_count(spec: str, cores: int | None = None) -> int:
    """FLOCK_EDGES: a number, or "auto" = one edge per core but one (at most 16); on hosts with
    two cores or fewer "auto" is 0 (one process): there a separate engine process measured no
    faster (bench/dataplane.py) and only adds processes competing for the same two cores."""
    if spec.strip().lower() == "auto":
        cores = cores or os.cpu_count() or 1
        return 0 if cores <= 2 else min(16, cores - 1)
    return max(0, int(spec))


def edge_of(p: int, partitions: list[int], n: int) -> int:
    """The stable rule: the i-th partition of the worker's list goes to edge i mod n."""
    return partitions.index(p) % n


def merge_round_robin(queues: list[deque], start: int, cap_tokens: int, cap_seqs: int) -> list[tuple[int, Any]]:
    """Take queued edge batches for one engine batch: one batch per edge in turn, starting at
    edge ``start``, while the token and sequence caps allow (the first batch always goes). An
    edge whose next batch does not fit is passed over; a busy edge cannot crowd out the others.
    Items need ``ids`` (tokens) and ``tenant_index`` (sequences). Returns (edge, item) in order."""
    picks: list[tuple[int, Any]] = []
    tokens = seqs = 0
    n = len(queues)
    progress = True
    while progress:
        progress = False
        for k in range(n):
            i = (start + k) % n
            q = queues[i]
            if not q:
                continue
            qt, qs = len(q[0].ids), len(q[0].tenant_index)
            if picks and (tokens + qt > cap_tokens or seqs + qs > cap_seqs):
                continue
            picks.append((i, q.popleft()))
            tokens, seqs, progress = tokens + qt, seqs + qs, True
    return picks


@dataclass
class _Queued:
    seq: int
    ids: np.ndarray
    tt: np.ndarray | None
    cu: np.ndarray
    tenant_index: np.ndarray
    tenants: list[str]


@dataclass
class Edge:
    index: int
    partitions: list[int]
    ring: SlotRing
    proc: Any = None
    writer: asyncio.StreamWriter | None = None
    gen: int = 0  # incarnation; results for an older one are dropped
    alive: bool = False
    ready: bool = False
    load: dict | None = None
    queue: deque = field(default_factory=deque)
    rpcs: dict[int, asyncio.Future] = field(default_factory=dict)
    restarts: int = 0
    quick_deaths: int = 0
    started: float = 0.0


class WorkerGroup:
    """Supervises the edges and hosts the engine for them; the agent's ``ServingWorker``."""

    def __init__(self, s: Settings, engine: Any, partitions: list[int], n_edges: int, metrics: WorkerMetrics,
                 version_changes=None, max_inflight: int = 2):
        self.s = s
        self.engine = engine
        self.partitions = partitions
        self.metrics = metrics
        self.version_changes = version_changes
        self.stopping = asyncio.Event()
        self.max_inflight = max_inflight
        n = max(1, min(n_edges, len(partitions)))
        self.layout = SlotLayout(slots=s.inflight_batches + 2, max_tokens=max(s.batch_max_tokens, s.max_seq_len + 1),
                                 max_seqs=s.batch_max_seqs)
        self.edges = [Edge(i, [p for p in partitions if edge_of(p, partitions, n) == i],
                           SlotRing(self.layout, create=True)) for i in range(n)]
        self._leases: dict[int, tuple[int, float]] = {}
        self._counts: dict[int, dict[str, list[int]]] = {}
        self._rid = itertools.count(1)
        self._work = asyncio.Event()
        self._rr = 0
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ the agent's view
    @property
    def ready(self) -> bool:
        return all(e.alive and e.ready for e in self.edges)

    @property
    def owned(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in self.edges:
            if e.alive and e.load:
                out.update(e.load["owned"])
        return out

    def set_leases(self, leases: dict[int, tuple[int, float]]) -> None:
        self._leases = dict(leases)
        for e in self.edges:
            self._send_leases(e)

    def _send_leases(self, e: Edge) -> None:
        if e.alive and (self.s.partitions.strip() == "leases"):
            write_frame(e.writer, ("leases", {p: v for p, v in self._leases.items() if p in e.partitions}))

    def _edge(self, p: int) -> Edge:
        return self.edges[edge_of(p, self.partitions, len(self.edges))]

    async def release_partition(self, p: int) -> bool:
        e = self._edge(p)
        if not e.alive:
            return False
        result = await self._call(e, "release", p)
        return result is True

    def release_done(self, p: int) -> None:
        e = self._edge(p)
        if e.alive:
            write_frame(e.writer, ("release_done", p))

    def prefetch(self, tenant_ids: list[str]) -> Any:
        return self.engine.prefetch(tenant_ids)

    def take_load(self) -> dict[str, Any]:
        counts, self._counts = self._counts, {}
        out = {"counts": counts, "highwater": {}, "lag": {}, "queue_depth": 0, "inflight": 0, "owned": {},
               "releasing": []}
        for e in self.edges:
            if not (e.alive and e.load):
                continue
            for k in ("highwater", "lag", "owned"):
                out[k].update(e.load[k])
            out["queue_depth"] += e.load["queue_depth"]
            out["inflight"] += e.load["inflight"]
            out["releasing"] += e.load["releasing"]
        out["releasing"].sort()
        return out

    async def _call(self, e: Edge, kind: str, *args: Any, timeout: float | None = None) -> Any:
        rid = next(self._rid)
        fut = asyncio.get_running_loop().create_future()
        e.rpcs[rid] = fut
        write_frame(e.writer, (kind, rid, *args))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            e.rpcs.pop(rid, None)

    async def edge_metrics(self) -> list[bytes]:
        async def one(e: Edge) -> bytes:
            try:
                return await self._call(e, "metrics", timeout=3)
            except (TimeoutError, ConnectionError):
                return b""
        return list(await asyncio.gather(*(one(e) for e in self.edges if e.alive)))

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        for e in self.edges:
            await self._spawn(e)
        self._spawn_task(self._merge_loop())
        if self.version_changes is not None:
            self._spawn_task(self._version_loop())
        log.info("worker group: %d edge processes over partitions %s", len(self.edges),
                 {e.index: e.partitions for e in self.edges})
        await self.stopping.wait()
        for e in self.edges:
            if e.alive:
                write_frame(e.writer, ("stop",))
        bound = self.s.shutdown_timeout_s + 10
        t0 = time.monotonic()
        for e in self.edges:
            if e.proc is None:
                continue
            try:
                await asyncio.wait_for(e.proc.wait(), max(0.1, bound - (time.monotonic() - t0)))
            except TimeoutError:
                log.warning("edge %d did not stop in %.0fs; killing it", e.index, bound)
                e.proc.kill()
                await e.proc.wait()
        for t in list(self._tasks):
            t.cancel()
        for e in self.edges:
            e.ring.close(unlink=True)

    def stop(self) -> None:
        self.stopping.set()

    def _spawn_task(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _spawn(self, e: Edge) -> None:
        ours, theirs = socket.socketpair()
        lay = self.layout
        env = {**os.environ, "FLOCK_GROUP_PID": str(os.getpid()), "TOKENIZERS_PARALLELISM": "false"}
        e.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.serving.edge", "--index", str(e.index), "--fd", str(theirs.fileno()),
            "--ring", e.ring.name, "--layout", f"{lay.slots},{lay.max_tokens},{lay.max_seqs}",
            "--partitions", ",".join(map(str, e.partitions)), pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        reader, e.writer = await asyncio.open_unix_connection(sock=ours)
        e.gen += 1
        e.started = time.monotonic()
        e.alive, e.ready, e.load = True, False, None
        self._send_leases(e)
        self._spawn_task(self._read_edge(e, reader, e.gen))

    async def _read_edge(self, e: Edge, reader: asyncio.StreamReader, gen: int) -> None:
        while True:
            msg = await read_frame(reader)
            if msg is None:
                break
            kind = msg[0]
            if kind == "batch":
                _, seq, slot, n, t, has_tt, tenants, inline = msg
                if slot >= 0:
                    ids, tt, cu, ten = e.ring.read(slot, n, t, has_tt)
                else:
                    ids, tt, cu, ten = inline
                e.queue.append(_Queued(seq, ids, tt, cu, ten, tenants))
                self._work.set()
            elif kind == "status":
                e.ready, load = msg[1], msg[2]
                if load is not None:
                    e.load = load
                    for p, tenants in load["counts"].items():
                        mine = self._counts.setdefault(p, {})
                        for tenant, (r, tok) in tenants.items():
                            c = mine.setdefault(tenant, [0, 0])
                            c[0] += r
                            c[1] += tok
            elif kind == "rpc":
                fut = e.rpcs.get(msg[1])
                if fut is not None and not fut.done():
                    fut.set_result(msg[2])
            elif kind == "prefetch":
                self.engine.prefetch(msg[1])
            elif kind == "invalidate":
                self.engine.invalidate(msg[1])
        # The edge is gone (exit, crash or kill -9).
        e.alive = e.ready = False
        e.queue.clear()
        for fut in e.rpcs.values():
            if not fut.done():
                fut.set_exception(ConnectionError("edge process gone"))
        e.writer.close()
        rc = await e.proc.wait()
        if self.stopping.is_set():
            log.info("edge %d stopped (exit %s)", e.index, rc)
            return
        e.restarts += 1
        self.metrics.edge_restarts.inc()
        # Back off when an edge keeps dying young (a bad setting, a broker it cannot reach).
        e.quick_deaths = e.quick_deaths + 1 if time.monotonic() - e.started < 30 else 0
        delay = min(30.0, 0.5 * 2 ** e.quick_deaths)
        log.error("edge %d exited with %s; restarting it in %.1fs (its unacknowledged requests are replayed)",
                  e.index, rc, delay)
        await asyncio.sleep(delay)
        if not self.stopping.is_set():
            await self._spawn(e)

    # ------------------------------------------------------------ engine host
    async def _merge_loop(self) -> None:
        """Merge queued edge batches into engine batches, one edge batch per edge in turn."""
        cap_tokens, cap_seqs = self.s.batch_max_tokens, self.s.batch_max_seqs
        while True:
            if self._inflight >= self.max_inflight or not any(e.queue for e in self.edges):
                self._work.clear()
                await self._work.wait()
                continue
            t0 = thread_time()
            n = len(self.edges)
            picks = merge_round_robin([e.queue for e in self.edges], self._rr, cap_tokens, cap_seqs)
            parts = [(self.edges[i], self.edges[i].gen, q) for i, q in picks]
            self._rr = (self._rr + 1) % n
            self._inflight += 1
            self.metrics.stage_cpu.add("engine", t0)
            self._spawn_task(self._run(parts))

    def _packed(self, parts: list[tuple[Edge, int, _Queued]]):
        import torch

        from workers.engine.batch import PackedBatch
        qs = [q for _, _, q in parts]
        ids = np.concatenate([q.ids for q in qs]).astype(np.int64)
        tt = None
        if any(q.tt is not None for q in qs):
            tt = np.concatenate([q.tt if q.tt is not None else np.zeros(len(q.ids), np.int32) for q in qs]).astype(np.int64)
        cu = [np.zeros(1, np.int64)]
        off = 0
        for q in qs:
            cu.append(q.cu[1:].astype(np.int64) + off)
            off += int(q.cu[-1])
        tenant_ids = []
        for q in qs:  # the engine wants one name per sequence: one C-level take per edge batch
            tenant_ids += np.asarray(q.tenants, dtype=object)[q.tenant_index].tolist()
        return PackedBatch(torch.from_numpy(ids), torch.from_numpy(np.concatenate(cu)), tenant_ids,
                           torch.from_numpy(tt) if tt is not None else None)

    async def _run(self, parts: list[tuple[Edge, int, _Queued]]) -> None:
        try:
            t0 = thread_time()
            try:
                fut = self.engine.submit(self._packed(parts))
            finally:
                self.metrics.stage_cpu.add("engine", t0)
            t_submit = time.monotonic()
            try:
                outputs = await asyncio.wrap_future(fut)
            finally:
                self.metrics.engine_seconds.observe(time.monotonic() - t_submit)
        except Exception as exc:  # noqa: BLE001 - the batch fails, not the group
            if len(parts) > 1:  # one edge's batch must not fail the others': run them one by one
                self._inflight -= 1
                for part in parts:
                    self._inflight += 1
                    await self._run([part])
                return
            for e, gen, q in parts:
                if e.alive and e.gen == gen:
                    write_frame(e.writer, ("result", q.seq, None, f"engine failed: {exc}"))
            self._inflight -= 1
            self._work.set()
            return
        self._inflight -= 1
        self._work.set()
        t0 = thread_time()
        self.metrics.engine_batch_seqs.observe(len(outputs))
        i = 0
        for e, gen, q in parts:
            n = len(q.tenant_index)
            if e.alive and e.gen == gen:
                write_frame(e.writer, ("result", q.seq, encode_outputs(outputs, i, i + n), None))
            i += n
        self.metrics.stage_cpu.add("engine", t0)

    async def _version_loop(self) -> None:
        await follow_active_versions(self.version_changes, self.engine.invalidate, self.s.version_poll_s)
