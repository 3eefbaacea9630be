"""Flock's encoder forward: shared base ops over the whole packed batch, PET deltas on own rows.

The encoder knows no PET type by name: at each point of a layer it calls the hook of every PET
group whose type registered it (``pets/registry.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.attention import packed_attention
from workers.engine.kernels import interpret, triton_available
from workers.engine.model_loading import BaseWeights
from workers.engine.options import EngineOptions, Tuned
from workers.engine.pets.registry import HOOKS, with_hook

_ACT = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}


class Encoder:
    def __init__(self, base: BaseWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 options: EngineOptions | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.base = base.to(self.device, dtype)
        self.dims = base.dims
        self.act = _ACT[base.activation]
        self.options = options or EngineOptions()
        self.tuned = Tuned()  # kernel choices timed on first use (options "auto"), per instance
        # CUDA low-precision fast path: GELU fused into the FFN-in GEMM epilogue (cuBLASLt, tanh
        # approximation: differs from erf-GELU by < 1e-3, below bf16 resolution) and fused residual
        # add + LayerNorm in Triton. Exact torch ops otherwise (CPU, fp32, tests).
        # TRITON_INTERPRET=1 runs the same fast path on CPU (numpy interpreter) so tests cover it.
        self.fast = ((self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)) or
                     (interpret() and self.device.type == "cpu")) and triton_available()
        self.fast_gelu = self.fast and base.activation in ("gelu", "gelu_tanh")
        self.lora_into_gemm = self.fast and self.options.lora_into_gemm
        self._hooks = {h: with_hook(h) for h in HOOKS}  # hook -> {pet type: ops module}
        self.plot = None  # plot.serve.PlotRuntime of a skipping base (set by the engine)
        self.fp8 = None  # fp8.Fp8Gemms of an FP8 base (enable_fp8)
        self.observe = None  # (layer, site group, GEMM input) -> None: FP8 calibration

    def enable_fp8(self, act_amax: torch.Tensor) -> None:
        """Serve the shared GEMMs in e4m3 with these calibrated input amaxes (fp8.py)."""
        from workers.engine.fp8 import Fp8Gemms
        # quantising kernels on CUDA only (the interpreter does not round e4m3 as the GPU does)
        self.fp8 = Fp8Gemms(self.base, act_amax, self.device, self.dtype,
                            use_kernels=self.fast and self.device.type == "cuda")
        self.lora_into_gemm = False  # the FP8 GEMM does not accumulate into a prepared output

    def _at(self, plan, hook: str):
        """(group, ops) of the plan's PET groups whose type acts at ``hook``, in plan order."""
        ops = self._hooks[hook]
        return [(g, ops[g.pet_type]) for g in plan.groups if g.pet_type in ops]

    def embed(self, plan) -> torch.Tensor:
        b = self.base
        x = b.word_emb.index_select(0, plan.input_ids) + b.pos_emb.index_select(0, plan.positions)
        if b.type_emb is not None:
            tt = plan.token_type_ids
            x = x + (b.type_emb.index_select(0, tt) if tt is not None else b.type_emb[0])
        return F.layer_norm(x, (x.shape[-1],), b.emb_ln_w, b.emb_ln_b, b.eps)

    def _gemm(self, plan, i: int, group: str, lw, x: torch.Tensor | None, xq=None) -> torch.Tensor:
        """y = x w^T + b (the layer's shared GEMM for this site group) plus every PET group's delta.
        xq: x's e4m3 copy already made by its producer (FP8 base); x None: only xq exists (no
        PET group reads this GEMM's input)."""
        if self.observe is not None:
            self.observe(i, group, x)
        w, b = lw.params(group)
        init = self._init_groups(plan, group) if self.lora_into_gemm else []
        if not init:
            epi = self._epilogue_group(plan, i, group, lw, x)
            if epi is not None:  # the shared GEMM in Triton, that group's delta in its epilogue
                g, ops = epi
                y = ops.linear_gemm(g, i, group, x, w, b)
                self._linear(plan, i, group, lw, x, y, skip={id(g)})
                return y
            y = self._shared(plan, i, group, x, w, b, xq)
            self._linear(plan, i, group, lw, x, y)
            return y
        T = x.shape[0]
        y = torch.empty(T, w.shape[0], device=x.device, dtype=x.dtype)
        covered = sorted((g.seg.t0, g.seg.t1) for g, _ in init)
        t = 0
        for t0, t1 in covered + [(T, T)]:
            if t0 > t:  # rows of no initialised group: bias only
                y[t:t0].copy_(b.expand(t0 - t, -1))
            t = max(t, t1)
        for g, ops in init:
            ops.linear_init(g, i, group, x, y, b)
        y.addmm_(x, w.t())
        self._linear(plan, i, group, lw, x, y, skip={id(g) for g, _ in init})
        return y

    def _epilogue_group(self, plan, i, group, lw, x):
        """(group, ops) whose delta goes into the epilogue of a Triton GEMM for this site group, or
        None: one such group, no FP8, no row-replacing group, and (option "auto") measured faster
        than cuBLAS + that group's own pass on the first batch of this shape."""
        mode = self.options.lora_gemm
        if mode == "0" or not self.fast or self.fp8 is not None or x is None or torch.is_grad_enabled():
            return None
        cand = [(g, ops) for g, ops in self._at(plan, "linear_gemm") if ops.gemm_ok(g, group, x)]
        if len(cand) != 1 or self._at(plan, "linear_replace"):
            return None
        if mode == "1" or interpret():
            return cand[0]
        g, ops = cand[0]
        key = (group, tuple(x.shape[1:]), g.seg.n_tiles.bit_length(), x.shape[0].bit_length(), x.dtype)
        wins = self.tuned.lora_gemm.get(key)
        if wins is None:
            from workers.engine.kernels import time_us
            w, b = lw.params(group)

            def separate():
                y = torch.addmm(b, x, w.t())
                ops.linear(g, i, group, x, y, lw, self)
            try:
                t = {"epilogue": time_us(lambda: ops.linear_gemm(g, i, group, x, w, b)), "cublas+pass": time_us(separate)}
            except Exception as exc:  # a kernel that does not build here is simply not chosen
                t = {"epilogue": float("inf"), "cublas+pass": 0.0, "error": repr(exc)[:200]}
            self.tuned.lora_gemm_us[str(key)] = t
            wins = self.tuned.lora_gemm[key] = t["epilogue"] < t["cublas+pass"]
        return cand[0] if wins else None

    def _shared(self, plan, i, group, x, w, b, xq=None) -> torch.Tensor:
        """x w^T + b on the rows no "linear_replace" group rewrites (their rows are left unset)."""
        skip = sorted((g.seg.t0, g.seg.t1) for g, _ in self._at(plan, "linear_replace"))
        if self.fp8 is not None:
            if xq is None:
                xq = self.fp8.quantize(i, group, x)
            if not skip:
                return self.fp8.linear(i, group, xq, b)
            x = xq  # spans below slice the e4m3 input
        if not skip:
            return torch.addmm(b, x, w.t())
        T = x.shape[0]
        spans, t = [], 0
        for t0, t1 in skip + [(T, T)]:
            if t0 > t:
                spans.append((t, t0))
            t = max(t, t1)
        if torch.is_grad_enabled():  # out= does not record autograd (trainer): assemble instead
            y = x.new_zeros(T, w.shape[0])
            for a, c in spans:
                y[a:c] = torch.addmm(b, x[a:c], w.t())
            return y
        y = torch.empty(T, w.shape[0], device=x.device, dtype=self.dtype)
        for a, c in spans:
            if self.fp8 is not None:
                y[a:c] = self.fp8.linear(i, group, x[a:c], b)
            else:
                torch.addmm(b, x[a:c], w.t(), out=y[a:c])
        return y

    def _init_groups(self, plan, group: str) -> list:
        """Groups that write bias + delta before the GEMM (all or none: one GEMM accumulates)."""
        init = [(g, ops) for g, ops in self._at(plan, "linear_init") if ops.linear_touches(g, group)]
        by_ops: dict = {}
        for g, ops in init:
            by_ops.setdefault(ops, []).append(g)
        return init if all(ops.can_init(gs, group) for ops, gs in by_ops.items()) else []

    def _linear(self, plan, i: int, group: str, lw, x: torch.Tensor, y: torch.Tensor, skip=frozenset()) -> None:
        """Add every PET group's delta for one linear site group (each touches only its rows)."""
        for g, ops in self._at(plan, "linear"):
            if id(g) not in skip and (x is not None or ops.linear_touches(g, group)):
                ops.linear(g, i, group, x, y, lw, self)

    def _add_layer_norm(self, plan, i, ln_site, x, o, w, b, q_for=None):
        """(LayerNorm(x + o) with the PET groups' LayerNorm deltas, its e4m3 copy or None). q_for:
        (layer, site group) of the GEMM that reads the output, on an FP8 base."""
        if self.fast:
            ln = self._at(plan, "layer_norm")
            if len(ln) <= 1:  # LayerNorm gamma/beta deltas: per-row affine inside the fused kernel
                from workers.engine.kernels.triton_norm import add_layer_norm
                delta = ln[0][1].ln_delta(ln[0][0], i, ln_site) if ln else None
                if self.fp8 is not None and self.fp8.use_kernels and q_for is not None:
                    return add_layer_norm(o, x, w, b, self.base.eps, delta, self.fp8.inv_x[q_for])
                return add_layer_norm(o, x, w, b, self.base.eps, delta), None
        return self._layer_norm(plan, i, ln_site, x + o, w, b), None

    def _ffn_in(self, plan, i, lw, x, xq=None):
        """(FFN-in output after the nonlinearity, or None, and its e4m3 copy, or None): on an FP8
        base with no PET group reading FFN-out's input, GELU and quantisation are one pass."""
        if self._scales(plan, "in.ffn_in"):  # input scaling: a scaled copy (x stays the residual)
            x = x.clone()
            self._scale(plan, i, "in.ffn_in", x)
            xq = None
        pre = self._scales(plan, "scale.ffn_pre")  # a scale between the GEMM and the nonlinearity
        if self.fast_gelu and not pre:
            touch = [(g, ops) for g, ops in self._at(plan, "linear") if ops.linear_touches(g, "ffn_in")]
            w, b = lw.params("ffn_in")
            if not touch and self.fp8 is not None:
                y = self._shared(plan, i, "ffn_in", x, w, b, xq)
                if not self._reads_ffn_out_input(plan):
                    return None, self.fp8.quantize(i, "ffn_out", y, gelu=True)
                return F.gelu(y, approximate="tanh"), None
            if not touch:
                return torch._addmm_activation(b, x, w.t(), use_gelu=True), None
            acts = [(g, ops) for g, ops in touch if g.pet_type in self._hooks["linear_act"]]
            if len(acts) == 1:  # the other groups' deltas first, then that group's delta + GELU in one
                f = self._shared(plan, i, "ffn_in", x, w, b, xq)  # row-wise pass over every row
                for g, ops in touch:
                    if g is not acts[0][0]:
                        ops.linear(g, i, "ffn_in", x, f, lw, self)
                acts[0][1].linear(acts[0][0], i, "ffn_in", x, f, lw, self, act="gelu_tanh")
                return f, None
        f = self._gemm(plan, i, "ffn_in", lw, x, xq)
        if pre:
            self._scale(plan, i, "scale.ffn_pre", f)
        return self.act(f), None

    def _reads_ffn_out_input(self, plan) -> bool:
        """Does any PET group of the plan read or scale FFN-out's input (the FFN activation)?"""
        return (any(ops.linear_touches(g, "ffn_out") for g, ops in self._at(plan, "linear"))
                or self._scales(plan, "ffn_act"))

    def _layer_norm(self, plan, i, ln_site, pre, w, b):
        out = F.layer_norm(pre, (pre.shape[-1],), w, b, self.base.eps)
        for g, ops in self._at(plan, "layer_norm"):
            ops.layer_norm(g, i, ln_site, pre, out, w, b, self.base.eps)
        return out

    def _output(self, plan, i, placement, h):
        for g, ops in self._at(plan, "output"):
            ops.output(g, i, placement, h)

    def _scales(self, plan, name) -> bool:
        return any(ops.scales(g, name) for g, ops in self._at(plan, "scale"))

    def _scale(self, plan, i, name, y):
        for g, ops in self._at(plan, "scale"):
            ops.scale(g, i, name, y)

    def _qkv_input(self, plan, i, x, qkv, lw):
        for g, ops in self._at(plan, "qkv_input"):
            ops.qkv_input(g, i, x, qkv, lw, self)

    def forward(self, plan) -> torch.Tensor:
        """Final hidden states [T, h] of the plan's (sorted) tokens. With lower-layer skipping
        (``self.plot`` set and ``plan.skip_split``), the lower K layers run only on the
        non-skipping prefix; the skipping rows' layer-K states come from the tri-gram table."""
        split = plan.skip_split if self.plot is not None else None
        if split is None or split[0] == plan.num_seqs:
            plan.wait_layer(0)
            return self._layers(plan, self.embed(plan), 0)
        ns, nt = split
        K = self.plot.skip
        parts = []
        if ns:
            sub = plan.prefix(ns, nt)
            plan.wait_layer(0)
            parts.append(self._layers(sub, self.embed(sub), 0, K))
        parts.append(self.plot.plan_states(plan, nt))
        return self._layers(plan, torch.cat(parts) if len(parts) > 1 else parts[0], K)

    def _layers(self, plan, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Layers [start, stop) on x; waits for the heads' uploads after the last layer."""
        heads = self.dims.heads
        layers = self.base.layers
        stop = len(layers) if stop is None else stop
        xq = None  # x's e4m3 copy for the next QKV GEMM (FP8 base)
        for i in range(start, stop):
            lw = layers[i]
            plan.wait_layer(i)
            qkv = self._gemm(plan, i, "qkv", lw, x, xq)
            self._qkv_input(plan, i, x, qkv, lw)
            self._scale(plan, i, "qkv", qkv)
            ctx = packed_attention(qkv, plan, heads, self.options, self.tuned)
            self._scale(plan, i, "in.attn_out", ctx)
            o = self._gemm(plan, i, "attn_out", lw, ctx)
            self._scale(plan, i, "scale.attn_out", o)
            self._output(plan, i, "attn", o)
            x, xq = self._add_layer_norm(plan, i, "attn_ln", x, o, *lw.params("attn_ln"), q_for=(i, "ffn_in"))
            f, fq = self._ffn_in(plan, i, lw, x, xq)
            if f is not None:
                self._scale(plan, i, "ffn_act", f)
            o2 = self._gemm(plan, i, "ffn_out", lw, f, fq)
            self._scale(plan, i, "scale.ffn_out", o2)
            self._output(plan, i, "ffn", o2)
            x, xq = self._add_layer_norm(plan, i, "ffn_ln", x, o2, *lw.params("ffn_ln"),
                                         q_for=(i + 1, "qkv") if i + 1 < stop else None)
        if stop == len(layers):
            plan.wait_layer(len(layers))  # heads
        return x
