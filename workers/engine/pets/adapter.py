"""Bottleneck adapters: h <- h + up(act(down(h))) after the attention-output dense (Houlsby only)
and after the FFN-output dense (Houlsby and Pfeiffer), before residual + LayerNorm.

Bank key: bottleneck bucket + variant + activation. Zero-padded bottleneck units contribute
act(0) * 0 = 0, so bucketing is exact. Layers the tenant skips hold zeros, i.e. identity.
"""

from __future__ import annotations

import torch

from schema.layout import ADAPTER_PLACEMENTS, BaseDims
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import segmented
from workers.engine.pets.common import layers_of, next_bucket

BOTTLENECK_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    bb = next_bucket(int(cfg["bottleneck"]), BOTTLENECK_BUCKETS)
    variant, act = cfg["variant"], cfg.get("activation", "relu")
    L, h = dims.layers, dims.hidden
    specs = {}
    for p in ADAPTER_PLACEMENTS[variant]:
        specs[f"{p}.down_w"] = SlotSpec((L, bb, h))
        specs[f"{p}.down_b"] = SlotSpec((L, bb))
        specs[f"{p}.up_w"] = SlotSpec((L, 1, h, bb))
        specs[f"{p}.up_b"] = SlotSpec((L, 1, h))
    return BankLayout(f"adapter:b{bb}:{variant}:{act}", "adapter", specs, {"act": act})


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    cfg = delta.config
    b = int(cfg["bottleneck"])
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    for p in ADAPTER_PLACEMENTS[cfg["variant"]]:
        for i in layers_of(cfg, dims):
            pre = f"layers.{i}.adapter_{p}"
            out[f"{p}.down_w"][i, :b] = t[f"{pre}.down.weight"]
            out[f"{p}.down_b"][i, :b] = t[f"{pre}.down.bias"]
            out[f"{p}.up_w"][i, 0, :, :b] = t[f"{pre}.up.weight"]
            out[f"{p}.up_b"][i, 0] = t[f"{pre}.up.bias"]
    return out


def output(group, layer: int, placement: str, hidden: torch.Tensor) -> None:
    """In place on hidden[group rows]: h + up(act(down(h)))."""
    bank = group.bank
    dw = bank.get(f"{placement}.down_w")
    if dw is None:
        return
    seg = group.seg
    hs = hidden[seg.t0:seg.t1]
    z = segmented.shrink(hs, dw[:, layer], seg, bank.get(f"{placement}.down_b")[:, layer], bank.extra["act"])
    # The expand reads z, not hs, so adding into hs in place is safe.
    segmented.expand_add(z, bank.get(f"{placement}.up_w")[:, layer], seg, hs, [0],
                         bank.get(f"{placement}.up_b")[:, layer])
