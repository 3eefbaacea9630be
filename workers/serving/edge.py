"""An edge process of a worker group: the Kafka loop (workers.serving.worker.Worker) for a share
of the worker's partitions, with the engine in another process.

Started by the group supervisor (workers.serving.group) with a Unix socket (``--fd``) and the
name of its shared-memory slot ring. It decodes, validates, tokenises, admits and batches; packs
each batch into a free slot and sends a one-line frame; gets results back as arrays; builds,
produces and commits replies. Leases, hand-over calls and metrics requests come over the same
socket. If the engine process goes away the edge commits what is acknowledged and exits at once:
whatever was not answered is replayed by the next owner, nothing unanswered is committed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from time import thread_time
from typing import Any

from prometheus_client import generate_latest

from workers.config import Settings
from workers.serving.ipc import ArrayBatch, SlotLayout, SlotRing, decode_outputs, pack_works, read_frame, write_frame
from workers.serving.metrics import WorkerMetrics
from workers.serving.worker import Worker

log = logging.getLogger("flock.edge")


class EngineLost(Exception):
    pass


class RemoteEngine:
    """The engine API (submit/prefetch/invalidate) over the group's socket and slot ring."""

    def __init__(self, writer: asyncio.StreamWriter, ring: SlotRing, stage_cpu: Any):
        self.writer = writer
        self.stage_cpu = stage_cpu
        self.ring = ring
        self.free = list(range(ring.layout.slots))
        self.pending: dict[int, tuple[asyncio.Future, int, list[str]]] = {}
        self._seq = 0

    def submit(self, b: ArrayBatch) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        n, t = b.num_seqs, len(b.input_ids)
        lay = self.ring.layout
        if not self.free or n > lay.max_seqs or t > lay.max_tokens:
            slot, inline = -1, (b.input_ids, b.token_type_ids, b.cu_seqlens, b.tenant_index)
        else:
            slot, inline = self.free.pop(), None
            ids, tt, cu, ten = self.ring.views(slot)
            ids[:t] = b.input_ids
            if b.token_type_ids is not None:
                tt[:t] = b.token_type_ids
            cu[:n + 1] = b.cu_seqlens
            ten[:n] = b.tenant_index
        self._seq += 1
        tenant_of = [b.tenants[i] for i in b.tenant_index.tolist()]
        self.pending[self._seq] = (fut, slot, tenant_of)
        write_frame(self.writer, ("batch", self._seq, slot, n, t, b.token_type_ids is not None, b.tenants, inline))
        return fut

    def result(self, seq: int, res: dict | None, error: str | None) -> None:
        fut, slot, tenant_of = self.pending.pop(seq)
        if slot >= 0:
            self.free.append(slot)
        if fut.done():
            return
        if error is not None:
            fut.set_exception(RuntimeError(error))
        else:
            t0 = thread_time()
            fut.set_result(decode_outputs(res, tenant_of))
            self.stage_cpu.add("reply_encode", t0)  # unpacking results is part of building replies

    def prefetch(self, tenant_ids: list[str]) -> Any:
        write_frame(self.writer, ("prefetch", list(tenant_ids)))
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    def invalidate(self, tenant_id: str) -> None:
        write_frame(self.writer, ("invalidate", tenant_id))


class EdgeTokenizer:
    """IntakeTokenizer's ids(), packing straight into numpy (no torch tensors in the edge)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.vocab_size = inner.vocab_size

    def ids(self, reqs, max_len):
        return self.inner.ids(reqs, max_len)

    def pack(self, works) -> ArrayBatch:
        return pack_works(works)


async def run_edge(s: Settings, index: int, fd: int, ring_name: str, layout: SlotLayout,
                   partitions: list[int]) -> None:
    from workers.models import resolve_model_dir
    from workers.serving.main import keys_for, worker_config
    from workers.serving.tokens import IntakeTokenizer

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    ring = SlotRing(layout, name=ring_name)
    metrics = WorkerMetrics(engine_in_process=False)
    engine = RemoteEngine(writer, ring, metrics.stage_cpu)
    cfg = worker_config(s)
    cfg.partitions = partitions
    cfg.client_suffix = f"-e{index}"
    tok = EdgeTokenizer(IntakeTokenizer(str(resolve_model_dir(s.default_base_model, s.models_dir)), s.truncate))
    worker = Worker(cfg, engine, tok, metrics, load_keys=keys_for(s))  # signatures checked here, not in the engine process
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    lost = asyncio.Event()

    async def rpc(rid: int, coro) -> None:
        try:
            result = await coro
        except Exception as exc:  # noqa: BLE001 - the caller gets the failure, the edge serves on
            log.exception("group call failed")
            result = exc.__class__.__name__
        write_frame(writer, ("rpc", rid, result))

    async def control() -> None:
        while True:
            msg = await read_frame(reader)
            if msg is None:
                lost.set()
                return
            kind = msg[0]
            if kind == "result":
                engine.result(msg[1], msg[2], msg[3])
            elif kind == "leases":
                worker.set_leases(msg[1])
            elif kind == "release":
                asyncio.create_task(rpc(msg[1], worker.release_partition(msg[2])))
            elif kind == "release_done":
                worker.release_done(msg[1])
            elif kind == "metrics":
                write_frame(writer, ("rpc", msg[1], generate_latest(metrics.registry)))
            elif kind == "stop":
                worker.stop()

    async def status() -> None:
        while True:
            try:
                load = worker.take_load() if worker.ready else None
                write_frame(writer, ("status", worker.ready, load))
            except Exception:  # noqa: BLE001
                log.exception("status report failed")
            await asyncio.sleep(0.25)

    async def engine_watch() -> None:
        await lost.wait()
        if worker.stopping.is_set() and not engine.pending:
            return
        # The engine process is gone: batches at it will never come back. Commit what Kafka
        # acknowledged, then go; everything else is replayed by whoever owns the partitions next.
        log.error("engine process gone with %d batches outstanding; committing acked replies and exiting",
                  len(engine.pending))
        try:
            await asyncio.wait_for(worker.commit(), 3)
        finally:
            os._exit(3)

    tasks = [asyncio.create_task(c) for c in (control(), status(), engine_watch())]
    try:
        await worker.run()
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
        ring.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--ring", required=True)
    ap.add_argument("--layout", required=True, help="slots,max_tokens,max_seqs")
    ap.add_argument("--partitions", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[edge {a.index}]: %(message)s")
    try:  # die with the group's engine process (Linux): nothing may keep consuming without it
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    slots, max_tokens, max_seqs = (int(x) for x in a.layout.split(","))
    parts = [int(p) for p in a.partitions.split(",") if p]
    t0 = time.monotonic()
    asyncio.run(run_edge(Settings(), a.index, a.fd, a.ring, SlotLayout(slots, max_tokens, max_seqs), parts))
    log.info("edge %d exited after %.0fs", a.index, time.monotonic() - t0)


if __name__ == "__main__":
    main()
