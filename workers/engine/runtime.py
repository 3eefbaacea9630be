"""Engine: the async API the worker uses. ``submit(PackedBatch) -> Future[BatchOutputs]``.

Two engine threads (never an asyncio loop):
  launcher  - acquires adapters (pool), builds the plan and ships it on the copy stream, enqueues
              the forward on the compute stream (which waits for the copy event), enqueues the
              device->host copy of the results, records a done event. It does not wait for the GPU,
              so batch n+1's host prep, index upload and adapter uploads overlap batch n's compute.
  completer - waits for each batch's done event, scatters the batch's compact results (one D2H
              copy: top label, top score, padded scores/logits, token results) into the
              batch-order numpy arrays of a BatchOutputs (no per-row Python), releases the
              batch's pinned slots, resolves the future. Rows are materialised lazily
              (``outputs[i]``), by whoever builds the reply.
At most ``max_inflight`` batches are between the two. On CPU the same code runs synchronously.
Pinned staging buffers come from torch's caching host allocator, which recycles a buffer only
after the copy that used it has completed (i.e. an N-deep ring of pinned buffers).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from schema.layout import lowest_layer
from workers.engine import heads
from workers.engine.batch import BatchOutputs, PackedBatch, TenantInfo
from workers.engine.encoder import Encoder
from workers.engine.errors import BatchError, EngineError
from workers.engine.kernels import interpret, triton_available
from workers.engine.model_loading import load_base
from workers.engine.options import EngineOptions
from workers.engine.plan import build_plan
from workers.engine.plot.serve import PlotRuntime, plot_skip
from workers.engine.fp8 import fp8_amax
from workers.engine.pool import AdapterPool, Loader, PoolConfig, Resident


@dataclass
class _InFlight:
    batch: PackedBatch
    future: Future
    plan: object = None
    residents: list | None = None  # pinned residents (released by the completer)
    tenant_info: list | None = None  # TenantInfo per distinct tenant
    row_tenant: object = None  # np.int32 [B]: index into tenant_info per row
    host: object = None  # host (pinned on CUDA) float32 copy of heads.compact_results' buffer
    layout: tuple | None = None
    done: object = None
    start_ev: object = None
    t_submit: float = 0.0
    t_launch: float = 0.0
    t_prep: float = 0.0


def _info(r: Resident) -> TenantInfo:
    """The TenantInfo of a resident (immutable: built once, cached on it)."""
    if r.info is None:
        r.info = TenantInfo(r.version, r.task, r.labels)
    return r.info


class Engine:
    def __init__(self, model_dir: str, load_delta: Loader, device: str | None = None,
                 dtype: torch.dtype | None = None, pool_config: PoolConfig | None = None,
                 max_inflight: int = 2, options: EngineOptions | None = None,
                 plot_device_bytes: int = 1 << 30, plot_host_bytes: int = 4 << 30, plot_insert_rows: int = 8192):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        base = load_base(model_dir)
        self.encoder = Encoder(base, self.device, self.dtype, options)
        amax = fp8_amax(model_dir)  # an FP8 base (flockserve base build-fp8): e4m3 shared GEMMs
        if amax is not None:
            self.encoder.enable_fp8(amax)
        # A skipping base (plot.safetensors beside the checkpoint): tenants whose delta touches
        # only layers >= K get their layer-K states from the tri-gram table. The lowest layer of
        # each tenant is noted as its delta loads (the pool calls the loader on every cold load).
        self.plot = None
        self._lowest: dict[str, int] = {}
        if plot_skip(model_dir) is not None:
            self.plot = PlotRuntime(model_dir, self.encoder.base, self.device, self.dtype,
                                    plot_device_bytes, plot_host_bytes, insert_rows=plot_insert_rows)
            self.encoder.plot = self.plot
            inner, n_layers = load_delta, base.dims.layers

            def load_delta(tenant_id: str):
                d = inner(tenant_id)
                self._lowest[tenant_id] = lowest_layer(d.tensors, n_layers)
                return d
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
        """Queue a batch; the future resolves to a BatchOutputs (``outputs[i]``: sequence i's
        RowOutput, with the RequestOutput fields), in batch order."""
        if self._closed:
            raise EngineError("engine is closed")
        fut: Future = Future()
        self._inbox.put(_InFlight(batch, fut, t_submit=time.perf_counter()))
        return fut

    def run(self, batch: PackedBatch, timeout: float | None = None) -> BatchOutputs:
        return self.submit(batch).result(timeout)

    def prefetch(self, tenant_ids) -> Future:
        return self.pool.prefetch(tenant_ids)

    def invalidate(self, tenant_id: str) -> None:
        self.pool.invalidate(tenant_id)

    @property
    def options(self) -> EngineOptions:
        return self.encoder.options

    def skips(self, tenant_id: str) -> bool | None:
        """Whether a loaded tenant skips the lower layers (None: not a skipping base, or not loaded)."""
        if self.plot is None or tenant_id not in self._lowest:
            return None
        return self._lowest[tenant_id] >= self.plot.skip

    def plot_stats(self) -> dict | None:
        """Lower-layer skipping: K, table rows / bytes per tier, hits, misses, lookup and compute
        time (None for a plain base). For /metrics."""
        return self.plot.report() if self.plot is not None else None

    def tuned_choices(self) -> dict:
        """The kernel options and what "auto" chose so far (startup log, /metrics)."""
        fast = self.encoder.fast
        fp8 = self.encoder.fp8
        return {"fast_path": fast, "lora_into_gemm": self.encoder.lora_into_gemm,
                "fp8_base": None if fp8 is None else ("cublaslt" if fp8.native else "emulated"),
                "lora_fused": self.options.lora_fused, "varlen_attn": self.options.varlen_attn,
                **{f"tuned_{k}": v for k, v in self.encoder.tuned.report().items()}}

    @torch.inference_mode()
    def encode_base(self, batch: PackedBatch) -> torch.Tensor:
        """Plain base-model hidden states [T, h] in the batch's token order (no tenants)."""
        plan = build_plan(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, [None],
                          self.encoder.base.position_offset, self.device, False,
                          tenant_index=np.zeros(batch.num_seqs, dtype=np.int64))
        hidden = self.encoder.forward(plan)
        inv = torch.empty(plan.num_tokens, dtype=torch.long)
        inv[torch.from_numpy(plan.tok_perm)] = torch.arange(plan.num_tokens)
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
        # Distinct tenants and each row's index among them (one dict lookup per row, in C-speed
        # comprehension); everything after this works per tenant or on whole arrays.
        index: dict[str, int] = {}
        row_t = np.fromiter((index.setdefault(t, len(index)) for t in b.tenant_ids), dtype=np.int32,
                            count=b.num_seqs)
        uniq = list(index)
        got = self.pool.acquire(uniq)
        ress = [got[t] for t in uniq]
        ok = [isinstance(r, Resident) for r in ress]
        job.residents = [r for r, k in zip(ress, ok) if k]
        job.tenant_info = [_info(r) if k else TenantInfo(error=r) for r, k in zip(ress, ok)]
        job.row_tenant = row_t
        self._check_ids(b)
        if not job.residents:
            return
        seqs = None
        if not all(ok):  # drop failed tenants' sequences from the compute
            seqs = np.flatnonzero(np.asarray(ok)[row_t])
            ress = [r if k else None for r, k in zip(ress, ok)]
        copy_ctx = torch.cuda.stream(self.copy_stream) if self._cuda else contextlib.nullcontext()
        with copy_ctx:
            skip = None
            if self.plot is not None:
                k = self.plot.skip
                skip = [r is not None and self._lowest.get(r.tenant_id, 0) >= k for r in ress]
            plan = build_plan(b.input_ids, b.token_type_ids, b.cu_seqlens, ress, self.encoder.base.position_offset,
                              self.device, self._want_tiles, tenant_index=row_t, seqs=seqs, skip=skip)
            if self._cuda:
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
        plan.layer_events = self.pool.layer_events(job.residents)
        job.plan = plan
        job.t_prep = time.perf_counter()
        comp_ctx = torch.cuda.stream(self.compute_stream) if self._cuda else contextlib.nullcontext()
        with comp_ctx:
            if self._cuda:
                self.compute_stream.wait_event(copied)
                job.start_ev = torch.cuda.Event(enable_timing=True)
                job.start_ev.record(self.compute_stream)
            hidden = self.encoder.forward(plan)
            base = self.encoder.base
            buf, job.layout = heads.compact_results(plan, hidden, base.pooler_w, base.pooler_b)
            if self._cuda:  # ONE device->host copy of the whole batch's compact results
                job.host = torch.empty(buf.shape, dtype=torch.float32, pin_memory=True)
                job.host.copy_(buf, non_blocking=True)
                job.done = torch.cuda.Event(enable_timing=True)
                job.done.record(self.compute_stream)
            else:
                job.host = buf

    def _check_ids(self, b: PackedBatch) -> None:
        # An out-of-range index would be a device-side assert on CUDA (fatal for the process).
        base = self.encoder.base
        if int(b.input_ids.min()) < 0 or int(b.input_ids.max()) >= base.word_emb.shape[0]:
            raise BatchError("input id outside the vocabulary")
        cu = b.cu_seqlens.numpy()
        if int((cu[1:] - cu[:-1]).max()) + base.position_offset > base.pos_emb.shape[0]:
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
        b = job.batch
        base_t = b.enqueued_at or job.t_submit
        timings = {"queue_ms": (job.t_launch - job.t_submit) * 1e3, "prep_ms": (job.t_prep - job.t_launch) * 1e3
                   if job.t_prep else 0.0, "total_ms": (now - base_t) * 1e3}
        if gpu_ms is not None:
            timings["gpu_ms"] = gpu_ms
        out = BatchOutputs(b.tenant_ids, b.request_ids, job.tenant_info, job.row_tenant, timings=timings)
        plan = job.plan
        if plan is not None:
            self._fill(out, plan, job.host.numpy(), job.layout)
        self.pool.release(job.residents or [])
        job.residents = None
        job.future.set_result(out)

    @staticmethod
    def _fill(out: BatchOutputs, plan, h: np.ndarray, layout) -> None:
        """Scatter the compact result buffer (plan order) into batch-order arrays: numpy only."""
        C, Ct, Tt, tok_offsets = layout
        B, Bs = len(out), plan.num_seqs
        rows = plan.order  # original row of each sorted sequence
        n_lab = np.zeros(B, dtype=np.int32)
        n_lab[rows] = plan.rows[:, 6]
        out.n_labels = n_lab
        if C:
            seq = h[:Bs * (2 * C + 2)].reshape(Bs, 2 * C + 2)
            scores = np.zeros((B, C), dtype=np.float32)
            logits = np.zeros((B, C), dtype=np.float32)
            top_score = np.zeros(B, dtype=np.float32)
            top_idx = np.full(B, -1, dtype=np.int32)
            scores[rows] = seq[:, :C]
            logits[rows] = seq[:, C:2 * C]
            top_score[rows] = seq[:, 2 * C]
            top_idx[rows] = seq[:, 2 * C + 1].astype(np.int32)
            out.scores, out.logits, out.top_score, out.top_idx = scores, logits, top_score, top_idx
        if Ct:
            tok = h[Bs * (2 * C + 2 if C else 0):].reshape(Tt, Ct + 2)
            tok_start = np.zeros(B, dtype=np.int64)
            tok_len = np.zeros(B, dtype=np.int64)
            for hg, off in zip((hg for hg in plan.heads if hg.tok_order), tok_offsets):
                ln = hg.tok_lens_np
                r = rows[hg.tok_pos]
                tok_len[r] = ln
                tok_start[r] = off + np.cumsum(ln) - ln
            out.tok_start, out.tok_len = tok_start, tok_len
            out.tok_scores = np.ascontiguousarray(tok[:, :Ct])
            out.tok_top_score = np.ascontiguousarray(tok[:, Ct])
            out.tok_top_idx = tok[:, Ct + 1].astype(np.int32)

    def _fail_all(self, job: _InFlight, exc: Exception, release_slot: bool = True) -> None:
        err = exc if isinstance(exc, EngineError) else EngineError(f"batch failed: {exc!r}")
        if job.residents:
            self.pool.release(job.residents)
            job.residents = None
        if not job.future.done():
            job.future.set_result(BatchOutputs.failed(job.batch.tenant_ids, job.batch.request_ids, err))
        if release_slot:
            self._slots.release()
