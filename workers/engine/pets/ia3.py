"""IA3: learned scales on k and v outputs (bias included) and on the FFN intermediate activation
(after GELU, i.e. the input of ffn_out). One gathered multiply per site group on the group's rows.
"""

from __future__ import annotations

import torch

from workers.adapters.layout import BaseDims
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import segmented
from workers.engine.pets.common import layers_of, site_col


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    L = dims.layers
    # q columns of the qkv scale stay 1 so one multiply covers the fused output.
    return BankLayout("ia3", "ia3", {"scale.qkv": SlotSpec((L, 3 * dims.hidden), fill=1.0),
                                     "scale.ffn_act": SlotSpec((L, dims.intermediate), fill=1.0)})


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    sites = delta.config.get("sites", ["k", "v", "ffn_in"])
    for i in layers_of(delta.config, dims):
        for s in sites:
            v = t[f"layers.{i}.{s}.scale"]
            if s == "ffn_in":
                out["scale.ffn_act"][i] = v
            else:
                c = site_col(s, dims)
                out["scale.qkv"][i, c:c + v.numel()] = v
    return out


def apply_scale(group, layer: int, name: str, y: torch.Tensor) -> None:
    """name: "qkv" (k, v scales) or "ffn_act" (intermediate activation)."""
    seg = group.seg
    scale = group.bank.get(f"scale.{name}")[:, layer]
    if segmented.use_triton(y, seg):  # gathered in the kernel, no [rows, cols] scale tensor
        from workers.engine.kernels.triton_norm import rows_affine_
        rows_affine_(y, seg.t0, seg.t1, seg.tok_slots, scale=scale)
        return
    y[seg.t0:seg.t1] *= scale.index_select(0, seg.tok_slots)
