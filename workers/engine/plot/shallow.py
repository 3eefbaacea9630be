"""The shallow part of a skipping base, as SkipBERT assembles it.

A window (x[t-1], x[t], x[t+1]) is its own 3-token sequence: the base's embeddings at local
positions 0..2 (token type 0), the K shallow layers with edge slots masked out of attention, then
the gate ``h * sigmoid(Linear(h))`` per slot (edge slots zero). Token t's layer-K state is
``LayerNorm(tri[t][1] + tri[t+1][0] + tri[t-1][2] + pos2[t] + type2[tt[t]])``: its own slot in the
three windows that contain it, plus a second position and token-type embedding.

Everything here is plain differentiable torch (the distillation in ``build`` trains through it;
serving runs it under inference mode on the engine's device and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.engine.model_loading import BaseWeights, LayerWeights
from workers.engine.plot.trigrams import EDGE

_ACT = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
_LAYER_FIELDS = tuple(LayerWeights.__dataclass_fields__)


@dataclass
class ShallowWeights:
    skip: int  # K: the number of lower layers the table replaces
    layers: list[LayerWeights]  # the K shallow layers (their own copy: distillation trains them)
    gate_w: torch.Tensor  # [h]   Linear(h -> 1) of the gate
    gate_b: torch.Tensor  # [1]
    pos2: torch.Tensor  # [max_pos, h] second position embedding
    type2: torch.Tensor  # [types, h] second token-type embedding
    ln_w: torch.Tensor  # [h]
    ln_b: torch.Tensor

    @classmethod
    def init_from(cls, base: BaseWeights, skip: int) -> "ShallowWeights":
        """Before distillation: the base's lower layers, a gate that averages the three slots
        (sigmoid = 1/3), zero extra embeddings and the LayerNorm of layer K-1's output."""
        if not 1 <= skip < base.dims.layers:
            raise ValueError(f"skip must be in 1..{base.dims.layers - 1}, not {skip}")
        h = base.dims.hidden
        layers = [LayerWeights(**{k: v.detach().clone() for k, v in vars(lw).items()}) for lw in base.layers[:skip]]
        last = base.layers[skip - 1]
        types = base.type_emb.shape[0] if base.type_emb is not None else 1
        return cls(skip, layers, torch.zeros(h), torch.full((1,), -0.6931472), torch.zeros(base.pos_emb.shape[0], h),
                   torch.zeros(types, h), last.ffn_ln_w.detach().clone(), last.ffn_ln_b.detach().clone())

    def params(self) -> list[torch.Tensor]:
        return [getattr(lw, k) for lw in self.layers for k in _LAYER_FIELDS] + \
            [self.gate_w, self.gate_b, self.pos2, self.type2, self.ln_w, self.ln_b]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for safetensors (``layers.{i}.{field}``, ``gate_w``...)."""
        t = {f"layers.{i}.{k}": getattr(lw, k) for i, lw in enumerate(self.layers) for k in _LAYER_FIELDS}
        t.update(gate_w=self.gate_w, gate_b=self.gate_b, pos2=self.pos2, type2=self.type2, ln_w=self.ln_w,
                 ln_b=self.ln_b)
        return {k: v.detach().contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], skip: int) -> "ShallowWeights":
        layers = [LayerWeights(**{k: t[f"layers.{i}.{k}"] for k in _LAYER_FIELDS}) for i in range(skip)]
        return cls(skip, layers, t["gate_w"], t["gate_b"], t["pos2"], t["type2"], t["ln_w"], t["ln_b"])

    def to(self, device, dtype) -> "ShallowWeights":
        def mv(x):
            return x.to(device=device, dtype=dtype).contiguous()
        return ShallowWeights(self.skip, [LayerWeights(**{k: mv(v) for k, v in vars(lw).items()}) for lw in self.layers],
                              mv(self.gate_w), mv(self.gate_b), mv(self.pos2), mv(self.type2), mv(self.ln_w),
                              mv(self.ln_b))


def dense_layer(x: torch.Tensor, key_ok: torch.Tensor, lw: LayerWeights, heads: int, act: str,
                eps: float) -> torch.Tensor:
    """One post-LN BERT layer on a dense batch [N, L, h]; key_ok [N, L] bool (False: padding).
    Every row needs at least one True key."""
    N, L, H = x.shape
    qkv = F.linear(x, lw.qkv_w, lw.qkv_b).view(N, L, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_ok[:, None, None, :])
    ctx = ctx.transpose(1, 2).reshape(N, L, H)
    x = F.layer_norm(x + F.linear(ctx, lw.attn_out_w, lw.attn_out_b), (H,), lw.attn_ln_w, lw.attn_ln_b, eps)
    f = _ACT[act](F.linear(x, lw.ffn_in_w, lw.ffn_in_b))
    return F.layer_norm(x + F.linear(f, lw.ffn_out_w, lw.ffn_out_b), (H,), lw.ffn_ln_w, lw.ffn_ln_b, eps)


def window_states(base: BaseWeights, sw: ShallowWeights, win: torch.Tensor) -> torch.Tensor:
    """[N, 3, h] gated shallow states of N windows (int64 [N, 3], EDGE outside the sequence)."""
    ok = win != EDGE
    pos = torch.arange(base.position_offset, base.position_offset + 3, device=win.device)
    x = base.word_emb[win.clamp_min(0)] + base.pos_emb[pos]
    if base.type_emb is not None:
        x = x + base.type_emb[0]
    x = F.layer_norm(x, (x.shape[-1],), base.emb_ln_w, base.emb_ln_b, base.eps)
    for lw in sw.layers:
        x = dense_layer(x, ok, lw, base.dims.heads, base.activation, base.eps)
    g = torch.sigmoid(x @ sw.gate_w.unsqueeze(1) + sw.gate_b)
    return x * g * ok.unsqueeze(-1).to(x.dtype)


def assemble(tri: torch.Tensor, has_prev: torch.Tensor, has_next: torch.Tensor, local_pos: torch.Tensor,
             token_type: torch.Tensor | None, sw: ShallowWeights, eps: float) -> torch.Tensor:
    """Layer-K states [T, h] of packed tokens from each token's own window states tri [T, 3, h]:
    tri[t][1] + tri[t+1][0] (if t+1 is in t's sequence) + tri[t-1][2] (if t-1 is)."""
    s = tri[:, 1]
    z = tri[:1, 0] * 0
    s = s + torch.cat([tri[1:, 0], z]) * has_next.unsqueeze(1).to(s.dtype)
    s = s + torch.cat([z, tri[:-1, 2]]) * has_prev.unsqueeze(1).to(s.dtype)
    s = s + sw.pos2.index_select(0, local_pos) + (sw.type2[token_type] if token_type is not None else sw.type2[0])
    return F.layer_norm(s, (s.shape[-1],), sw.ln_w, sw.ln_b, eps)
