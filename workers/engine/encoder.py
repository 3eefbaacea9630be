"""Flock's encoder forward: shared base ops over the whole packed batch, PET deltas on own rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.attention import packed_attention
from workers.engine.kernels import triton_available
from workers.engine.model_loading import BaseWeights
from workers.engine.pets import adapter, bitfit, ia3, lora, sparse

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
        self.fast = (self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
                     and triton_available())
        self.fast_gelu = self.fast and base.activation in ("gelu", "gelu_tanh")

    def embed(self, plan) -> torch.Tensor:
        b = self.base
        x = b.word_emb.index_select(0, plan.input_ids) + b.pos_emb.index_select(0, plan.positions)
        if b.type_emb is not None:
            tt = plan.token_type_ids
            x = x + (b.type_emb.index_select(0, tt) if tt is not None else b.type_emb[0])
        return F.layer_norm(x, (x.shape[-1],), b.emb_ln_w, b.emb_ln_b, b.eps)

    def _linear(self, plan, i: int, group: str, lw, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every PET group's delta for one linear site group (each touches only its rows)."""
        for g in plan.groups:
            t = g.pet_type
            if t == "lora":
                lora.apply(g, i, group, x, y)
            elif t == "bitfit":
                bitfit.apply_bias(g, i, group, y)
            elif t == "diff":
                sparse.apply_diff(g, i, group, x, y)
            elif t == "maskbert":
                sparse.apply_mask(g, i, group, x, y, lw, self.dims)

    def _add_layer_norm(self, plan, i, ln_site, x, o, w, b):
        if self.fast and not any(g.pet_type == "bitfit" for g in plan.groups):
            from workers.engine.kernels.triton_norm import add_layer_norm
            return add_layer_norm(o, x, w, b, self.base.eps)
        return self._layer_norm(plan, i, ln_site, x + o, w, b)

    def _ffn_in(self, plan, i, lw, x):
        touched = any(g.pet_type in ("bitfit", "diff", "maskbert") or
                      (g.pet_type == "lora" and g.bank.get("A.ffn_in") is not None) for g in plan.groups)
        if self.fast_gelu and not touched:
            return torch._addmm_activation(lw.bi, x, lw.wi.t(), use_gelu=True)
        f = torch.addmm(lw.bi, x, lw.wi.t())
        self._linear(plan, i, "ffn_in", lw, x, f)
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

    def forward(self, plan) -> torch.Tensor:
        """Final hidden states [T, h] of the plan's (sorted) tokens."""
        heads = self.dims.heads
        plan.wait_layer(0)
        x = self.embed(plan)
        for i, lw in enumerate(self.base.layers):
            plan.wait_layer(i)
            qkv = torch.addmm(lw.bqkv, x, lw.wqkv.t())
            self._linear(plan, i, "qkv", lw, x, qkv)
            self._ia3(plan, i, "qkv", qkv)
            ctx = packed_attention(qkv, plan, heads)
            o = torch.addmm(lw.bo, ctx, lw.wo.t())
            self._linear(plan, i, "attn_out", lw, ctx, o)
            self._adapters(plan, i, "attn", o)
            x = self._add_layer_norm(plan, i, "attn_ln", x, o, lw.ln1_w, lw.ln1_b)
            f = self._ffn_in(plan, i, lw, x)
            self._ia3(plan, i, "ffn_act", f)
            o2 = torch.addmm(lw.bo2, f, lw.wo2.t())
            self._linear(plan, i, "ffn_out", lw, f, o2)
            self._adapters(plan, i, "ffn", o2)
            x = self._add_layer_norm(plan, i, "ffn_ln", x, o2, lw.ln2_w, lw.ln2_b)
        plan.wait_layer(len(self.base.layers))  # heads
        return x
