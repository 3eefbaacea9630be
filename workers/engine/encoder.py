"""Flock's encoder forward: shared base ops over the whole packed batch, PET deltas on own rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.attention import packed_attention
import os

from workers.engine.kernels import interpret, triton_available
from workers.engine.model_loading import BaseWeights
from workers.engine.pets import adapter, bitfit, ia3, lora, sparse

# Measured on H200 (BERT-base, 10k LoRA r8): the beta=1 GEMM costs +100 us per QKV call, as much as
# the read-modify-write it saves, so it is off by default (bench/engine.py times both).
LORA_INTO_GEMM = os.environ.get("FLOCK_LORA_INTO_GEMM", "0") == "1"

_ACT = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}


class Encoder:
    def __init__(self, base: BaseWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.base = base.to(self.device, dtype)
        self.dims = base.dims
        self.act = _ACT[base.activation]
        # CUDA low-precision fast path: GELU fused into the FFN-in GEMM epilogue (cuBLASLt, tanh
        # approximation: differs from erf-GELU by < 1e-3, below bf16 resolution) and fused residual
        # add + LayerNorm in Triton. Exact torch ops otherwise (CPU, fp32, tests).
        # TRITON_INTERPRET=1 runs the same fast path on CPU (numpy interpreter) so tests cover it.
        self.fast = ((self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)) or
                     (interpret() and self.device.type == "cpu")) and triton_available()
        self.fast_gelu = self.fast and base.activation in ("gelu", "gelu_tanh")
        # LoRA on the fast path: the expand writes bias + delta into the GEMM's output buffer and the
        # base GEMM accumulates into it (beta = 1): no read-modify-write pass over q|v after the GEMM.
        self.lora_into_gemm = self.fast and LORA_INTO_GEMM

    def embed(self, plan) -> torch.Tensor:
        b = self.base
        x = b.word_emb.index_select(0, plan.input_ids) + b.pos_emb.index_select(0, plan.positions)
        if b.type_emb is not None:
            tt = plan.token_type_ids
            x = x + (b.type_emb.index_select(0, tt) if tt is not None else b.type_emb[0])
        return F.layer_norm(x, (x.shape[-1],), b.emb_ln_w, b.emb_ln_b, b.eps)

    def _gemm(self, plan, i: int, group: str, lw, x: torch.Tensor) -> torch.Tensor:
        """y = x w^T + b (the layer's shared GEMM for this site group) plus every PET group's delta."""
        w, b = lw.params(group)
        lg = [g for g in plan.groups if g.pet_type == "lora" and g.bank.get(f"A.{group}") is not None] \
            if self.lora_into_gemm else []
        if not lg or not lora.can_init(lg, group):
            y = torch.addmm(b, x, w.t())
            self._linear(plan, i, group, lw, x, y)
            return y
        T = x.shape[0]
        y = torch.empty(T, w.shape[0], device=x.device, dtype=x.dtype)
        covered = sorted((g.seg.t0, g.seg.t1) for g in lg)
        t = 0
        for t0, t1 in covered + [(T, T)]:
            if t0 > t:  # rows of no LoRA group: bias only
                y[t:t0].copy_(b.expand(t0 - t, -1))
            t = max(t, t1)
        for g in lg:
            lora.apply_init(g, i, group, x, y, b)
        y.addmm_(x, w.t())
        self._linear(plan, i, group, lw, x, y, skip_lora=True)
        return y

    def _linear(self, plan, i: int, group: str, lw, x: torch.Tensor, y: torch.Tensor, skip_lora=False) -> None:
        """Add every PET group's delta for one linear site group (each touches only its rows)."""
        for g in plan.groups:
            t = g.pet_type
            if t == "lora":
                if not skip_lora:
                    lora.apply(g, i, group, x, y)
            elif t == "bitfit":
                bitfit.apply_bias(g, i, group, y)
            elif t == "diff":
                sparse.apply_diff(g, i, group, x, y)
            elif t == "maskbert":
                sparse.apply_mask(g, i, group, x, y, lw, self.dims)

    def _add_layer_norm(self, plan, i, ln_site, x, o, w, b):
        if self.fast:
            bf = [g for g in plan.groups if g.pet_type == "bitfit"]
            if len(bf) <= 1:  # BitFit gamma/beta deltas: per-row affine inside the fused kernel
                from workers.engine.kernels.triton_norm import add_layer_norm
                delta = bitfit.ln_delta(bf[0], i, ln_site) if bf else None
                return add_layer_norm(o, x, w, b, self.base.eps, delta)
        return self._layer_norm(plan, i, ln_site, x + o, w, b)

    def _ffn_in(self, plan, i, lw, x):
        if ia3.uses(plan.groups, "in.ffn_in"):  # IA3 input scaling: a scaled copy (x stays the residual)
            x = x.clone()
            self._ia3(plan, i, "in.ffn_in", x)
        pre = ia3.uses(plan.groups, "scale.ffn_pre")  # IA3 between the GEMM and the nonlinearity
        touched = pre or any(g.pet_type in ("diff", "maskbert") or
                             (g.pet_type == "lora" and g.bank.get("A.ffn_in") is not None) for g in plan.groups)
        bf = [g for g in plan.groups if g.pet_type == "bitfit"]
        if self.fast_gelu and not touched:
            if not bf:
                return torch._addmm_activation(lw.ffn_in_b, x, lw.ffn_in_w.t(), use_gelu=True)
            if len(bf) == 1:  # BitFit ffn_in bias deltas + GELU in one row-wise pass
                f = torch.addmm(lw.ffn_in_b, x, lw.ffn_in_w.t())
                bitfit.apply_bias(bf[0], i, "ffn_in", f, act="gelu_tanh")
                return f
        f = self._gemm(plan, i, "ffn_in", lw, x)
        if pre:
            self._ia3(plan, i, "scale.ffn_pre", f)
        return self.act(f)

    def _layer_norm(self, plan, i, ln_site, pre, w, b):
        out = F.layer_norm(pre, (pre.shape[-1],), w, b, self.base.eps)
        for g in plan.groups:
            if g.pet_type == "bitfit":
                bitfit.layer_norm(g, i, ln_site, pre, out, w, b, self.base.eps)
        return out

    def _adapters(self, plan, i, placement, h):
        for g in plan.groups:
            if g.pet_type == "adapter":
                adapter.apply(g, i, placement, h)

    def _ia3(self, plan, i, name, y):
        for g in plan.groups:
            if g.pet_type == "ia3":
                ia3.apply_scale(g, i, name, y)

    def _ia3_qkv_in(self, plan, i, x, qkv, lw):
        for g in plan.groups:
            if g.pet_type == "ia3":
                ia3.apply_qkv_in(g, i, x, qkv, lw, self.dims)

    def forward(self, plan) -> torch.Tensor:
        """Final hidden states [T, h] of the plan's (sorted) tokens."""
        heads = self.dims.heads
        plan.wait_layer(0)
        x = self.embed(plan)
        for i, lw in enumerate(self.base.layers):
            plan.wait_layer(i)
            qkv = self._gemm(plan, i, "qkv", lw, x)
            self._ia3_qkv_in(plan, i, x, qkv, lw)
            self._ia3(plan, i, "qkv", qkv)
            ctx = packed_attention(qkv, plan, heads)
            self._ia3(plan, i, "in.attn_out", ctx)
            o = self._gemm(plan, i, "attn_out", lw, ctx)
            self._ia3(plan, i, "scale.attn_out", o)
            self._adapters(plan, i, "attn", o)
            x = self._add_layer_norm(plan, i, "attn_ln", x, o, *lw.params("attn_ln"))
            f = self._ffn_in(plan, i, lw, x)
            self._ia3(plan, i, "ffn_act", f)
            o2 = self._gemm(plan, i, "ffn_out", lw, f)
            self._ia3(plan, i, "scale.ffn_out", o2)
            self._adapters(plan, i, "ffn", o2)
            x = self._add_layer_norm(plan, i, "ffn_ln", x, o2, *lw.params("ffn_ln"))
        plan.wait_layer(len(self.base.layers))  # heads
        return x
