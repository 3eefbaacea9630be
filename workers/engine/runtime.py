"""Engine: the async API the worker uses. ``submit(PackedBatch) -> Future[list[RequestOutput]]``.

Two engine threads (never an asyncio loop):
  launcher  - acquires adapters (pool), builds the plan and ships it on the copy stream, enqueues
              the forward on the compute stream (which waits for the copy event), enqueues the
              device->host copy of the results, records a done event. It does not wait for the GPU,
              so batch n+1's host prep, index upload and adapter uploads overlap batch n's compute.
  completer - waits for each batch's done event, turns scores into RequestOutputs, releases the
              batch's pinned slots, resolves the future.
At most ``max_inflight`` batches are between the two. On CPU the same code runs synchronously.
Pinned staging buffers come from torch's caching host allocator, which recycles a buffer only
after the copy that used it has completed (i.e. an N-deep ring of pinned buffers).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from workers.engine import heads
from workers.engine.batch import PackedBatch, RequestOutput
from workers.engine.encoder import Encoder
from workers.engine.errors import BatchError, EngineError
from workers.engine.kernels import interpret, triton_available
from workers.engine.model_loading import load_base
from workers.engine.plan import build_plan
from workers.engine.pool import AdapterPool, Loader, PoolConfig, Resident


@dataclass
class _InFlight:
    batch: PackedBatch
    future: Future
    outputs: list  # per original sequence: RequestOutput (errors prefilled)
    plan: object = None
    residents: list | None = None
    results: list | None = None  # [(head group, kind, host logits, host probs)]
    done: object = None
    start_ev: object = None
    t_submit: float = 0.0
    t_launch: float = 0.0
    t_prep: float = 0.0
    keep: list | None = None


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


class Engine:
    def __init__(self, model_dir: str, load_delta: Loader, device: str | None = None,
                 dtype: torch.dtype | None = None, pool_config: PoolConfig | None = None,
                 max_inflight: int = 2):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        base = load_base(model_dir)
        self.encoder = Encoder(base, self.device, self.dtype)
        self.dims = base.dims
        self.pool = AdapterPool(self.dims, self.device, self.dtype, load_delta, pool_config,
                                has_pooler=base.pooler_w is not None)
        self._cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.compute_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._want_tiles = (self._cuda or interpret()) and triton_available()
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max_inflight)
        self._closed = False
        self._launcher = threading.Thread(target=self._launch_loop, name="flock-engine-launch", daemon=True)
        self._completer = threading.Thread(target=self._complete_loop, name="flock-engine-complete", daemon=True)
        self._launcher.start()
        self._completer.start()

    # ---- public API ------------------------------------------------------------------------
    def submit(self, batch: PackedBatch) -> Future:
        """Queue a batch; the future resolves to one RequestOutput per sequence, in batch order."""
        if self._closed:
            raise EngineError("engine is closed")
        fut: Future = Future()
        self._inbox.put(_InFlight(batch, fut, [], t_submit=time.perf_counter()))
        return fut

    def run(self, batch: PackedBatch, timeout: float | None = None) -> list[RequestOutput]:
        return self.submit(batch).result(timeout)

    def prefetch(self, tenant_ids) -> Future:
        return self.pool.prefetch(tenant_ids)

    def invalidate(self, tenant_id: str) -> None:
        self.pool.invalidate(tenant_id)

    @torch.inference_mode()
    def encode_base(self, batch: PackedBatch) -> torch.Tensor:
        """Plain base-model hidden states [T, h] in the batch's token order (no tenants)."""
        plan = build_plan(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, [None] * batch.num_seqs,
                          self.encoder.base.position_offset, self.device, False)
        hidden = self.encoder.forward(plan)
        inv = torch.empty(plan.num_tokens, dtype=torch.long)
        perm = torch.cat([torch.arange(int(batch.cu_seqlens[b]), int(batch.cu_seqlens[b + 1])) for b in plan.order])
        inv[perm] = torch.arange(plan.num_tokens)
        return hidden.float().cpu()[inv]

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._launcher.join()
        self._completer.join()
        self.pool.close()

    # ---- launcher --------------------------------------------------------------------------
    def _launch_loop(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                self._outbox.put(None)
                return
            self._slots.acquire()
            try:
                self._launch(job)
            except Exception as e:  # a failure of the whole batch fails only this batch
                self._fail_all(job, e)
                continue
            self._outbox.put(job)

    @torch.inference_mode()
    def _launch(self, job: _InFlight) -> None:
        job.t_launch = time.perf_counter()
        b = job.batch
        got = self.pool.acquire(b.tenant_ids)
        job.residents = [r for r in got.values() if isinstance(r, Resident)]
        rids = b.request_ids or [None] * b.num_seqs
        job.outputs = [RequestOutput(tenant_id=t, request_id=rids[i]) for i, t in enumerate(b.tenant_ids)]
        for i, t in enumerate(b.tenant_ids):
            r = got[t]
            if isinstance(r, Resident):
                job.outputs[i].adapter_version, job.outputs[i].task = r.version, r.task
            else:
                job.outputs[i].error = r
        keep = [i for i, t in enumerate(b.tenant_ids) if isinstance(got[t], Resident)]
        job.keep = keep
        self._check_ids(b)
        if not keep:
            return
        if len(keep) < b.num_seqs:  # drop failed tenants' sequences from the compute
            cu = b.cu_seqlens.tolist()
            ids = torch.cat([b.input_ids[cu[i]:cu[i + 1]] for i in keep])
            tts = torch.cat([b.token_type_ids[cu[i]:cu[i + 1]] for i in keep]) if b.token_type_ids is not None else None
            lens = torch.tensor([cu[i + 1] - cu[i] for i in keep])
            cus = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        else:
            ids, tts, cus = b.input_ids, b.token_type_ids, b.cu_seqlens
        residents = [got[b.tenant_ids[i]] for i in keep]
        copy_ctx = torch.cuda.stream(self.copy_stream) if self._cuda else _Null()
        with copy_ctx:
            plan = build_plan(ids, tts, cus, residents, self.encoder.base.position_offset, self.device,
                              self._want_tiles)
            if self._cuda:
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
        plan.layer_events = self.pool.layer_events(residents)
        job.plan = plan
        job.t_prep = time.perf_counter()
        comp_ctx = torch.cuda.stream(self.compute_stream) if self._cuda else _Null()
        with comp_ctx:
            if self._cuda:
                self.compute_stream.wait_event(copied)
                job.start_ev = torch.cuda.Event(enable_timing=True)
                job.start_ev.record(self.compute_stream)
            hidden = self.encoder.forward(plan)
            base = self.encoder.base
            pooled = heads.pool(hidden, plan, base.pooler_w, base.pooler_b) if any(hg.seq_order for hg in plan.heads) else None
            results = []
            for hg in plan.heads:
                for kind in ("seq", "tok"):
                    if kind == "seq" and not hg.seq_order or kind == "tok" and not hg.tok_order:
                        continue
                    logits, probs = heads.seq_logits(hg, pooled) if kind == "seq" else heads.token_logits(hg, hidden)
                    both = torch.stack([logits.float(), probs])
                    host = torch.empty(both.shape, dtype=torch.float32, pin_memory=self._cuda)
                    host.copy_(both, non_blocking=self._cuda)
                    results.append((hg, kind, host))
            job.results = results
            if self._cuda:
                job.done = torch.cuda.Event(enable_timing=True)
                job.done.record(self.compute_stream)

    def _check_ids(self, b: PackedBatch) -> None:
        # An out-of-range index would be a device-side assert on CUDA (fatal for the process).
        base = self.encoder.base
        if int(b.input_ids.min()) < 0 or int(b.input_ids.max()) >= base.word_emb.shape[0]:
            raise BatchError("input id outside the vocabulary")
        if max(b.lengths()) + base.position_offset > base.pos_emb.shape[0]:
            raise BatchError("sequence longer than the model's position embeddings")
        if b.token_type_ids is not None and base.type_emb is not None and \
                (int(b.token_type_ids.min()) < 0 or int(b.token_type_ids.max()) >= base.type_emb.shape[0]):
            raise BatchError("token type id out of range")

    # ---- completer -------------------------------------------------------------------------
    def _complete_loop(self) -> None:
        while True:
            job = self._outbox.get()
            if job is None:
                return
            try:
                if job.done is not None:
                    job.done.synchronize()
                self._finish(job)
            except Exception as e:
                self._fail_all(job, e, release_slot=False)
            finally:
                self._slots.release()

    def _finish(self, job: _InFlight) -> None:
        now = time.perf_counter()
        gpu_ms = job.start_ev.elapsed_time(job.done) if job.start_ev is not None else None
        plan = job.plan
        if plan is not None:
            keep = job.keep
            order, res_sorted = plan.order.tolist(), plan.residents
            for hg, kind, host in job.results:
                logits, probs = host[0], host[1]
                if kind == "seq":
                    for row, s in enumerate(hg.seq_order):
                        out = job.outputs[keep[order[s]]]
                        res = res_sorted[s]
                        n = res.n_labels
                        p = probs[row, :n]
                        out.scores, out.logits = p.tolist(), logits[row, :n].tolist()
                        out.label = res.labels[int(p.argmax())]
                        out.labels = list(res.labels)
                else:
                    off = 0
                    for s, ln in zip(hg.tok_order, hg.tok_lens):
                        out = job.outputs[keep[order[s]]]
                        res = res_sorted[s]
                        n = res.n_labels
                        p = probs[off:off + ln, :n]
                        out.token_scores = p.tolist()
                        out.token_labels = [res.labels[j] for j in p.argmax(-1).tolist()]
                        off += ln
        self.pool.release(job.residents or [])
        base_t = job.batch.enqueued_at or job.t_submit
        timings = {"queue_ms": (job.t_launch - job.t_submit) * 1e3, "prep_ms": (job.t_prep - job.t_launch) * 1e3
                   if job.t_prep else 0.0, "total_ms": (now - base_t) * 1e3}
        if gpu_ms is not None:
            timings["gpu_ms"] = gpu_ms
        for o in job.outputs:
            o.timings = dict(timings)
        job.future.set_result(job.outputs)

    def _fail_all(self, job: _InFlight, exc: Exception, release_slot: bool = True) -> None:
        err = exc if isinstance(exc, EngineError) else EngineError(f"batch failed: {exc!r}")
        if job.residents:
            self.pool.release(job.residents)
            job.residents = None
        rids = job.batch.request_ids or [None] * job.batch.num_seqs
        outs = [RequestOutput(tenant_id=t, request_id=rids[i], error=err) for i, t in enumerate(job.batch.tenant_ids)]
        if not job.future.done():
            job.future.set_result(outs)
        if release_slot:
            self._slots.release()
