"""BitFit: per-tenant bias deltas on every linear site, optional LayerNorm gamma/beta deltas.

Applied as a per-token gathered add on the group's rows (one gather + one add per site group,
whatever the tenant count). LayerNorm deltas re-normalise the group's rows with per-row affine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from schema.layout import LAYERNORM_SITES, LINEAR_SITES, BaseDims
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import segmented
from workers.engine.pets.common import GROUPS, SITE_GROUP, group_out, layers_of, site_col


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    L, h = dims.layers, dims.hidden
    specs = {f"bias.{g}": SlotSpec((L, group_out(g, dims))) for g in GROUPS}
    for ln in LAYERNORM_SITES:
        specs[f"{ln}.weight"] = SlotSpec((L, h))
        specs[f"{ln}.bias"] = SlotSpec((L, h))
    return BankLayout("bitfit", "bitfit", specs)


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    for i in layers_of(delta.config, dims):
        for s in LINEAR_SITES:
            c = site_col(s, dims)
            b = t[f"layers.{i}.{s}.bias"]
            out[f"bias.{SITE_GROUP[s]}"][i, c:c + b.numel()] = b
        for ln in LAYERNORM_SITES:
            for p in ("weight", "bias"):
                name = f"layers.{i}.{ln}.{p}"
                if name in t:
                    out[f"{ln}.{p}"][i] = t[name]
    return out


def linear_touches(group, site_group: str) -> bool:
    return True


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer=None, enc=None,
           act: str = "none") -> None:
    """y[rows] += bias delta[slot]; act (fast path only: "gelu_tanh") then runs on every row of y."""
    seg = group.seg
    bias = group.bank.get(f"bias.{site_group}")[:, layer]
    if segmented.use_triton(y, seg):  # gathered in the kernel, no [rows, cols] bias tensor
        from workers.engine.kernels.triton_norm import rows_affine_
        rows_affine_(y, seg.t0, seg.t1, seg.tok_slots, bias=bias, act=act)
        return
    assert act == "none"
    y[seg.t0:seg.t1] += bias.index_select(0, seg.tok_slots)


def ln_delta(group, layer: int, ln_site: str):
    """(t0, t1, tok_slots, d_gamma, d_beta) for the fused add + LayerNorm kernel."""
    seg, bank = group.seg, group.bank
    return (seg.t0, seg.t1, seg.tok_slots, bank.get(f"{ln_site}.weight")[:, layer], bank.get(f"{ln_site}.bias")[:, layer])


def layer_norm(group, layer: int, ln_site: str, pre: torch.Tensor, out: torch.Tensor,
               base_w: torch.Tensor, base_b: torch.Tensor, eps: float) -> None:
    """out[rows] = LN(pre[rows]) * (gamma + d_gamma[slot]) + (beta + d_beta[slot])."""
    seg = group.seg
    bank = group.bank
    dw = bank.get(f"{ln_site}.weight")[:, layer].index_select(0, seg.tok_slots)
    db = bank.get(f"{ln_site}.bias")[:, layer].index_select(0, seg.tok_slots)
    normed = F.layer_norm(pre[seg.t0:seg.t1], (pre.shape[-1],), eps=eps)
    out[seg.t0:seg.t1] = normed * (base_w + dw) + (base_b + db)
