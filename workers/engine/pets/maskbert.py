"""MaskBERT: W' = W * M per tenant, M unpacked from little-endian packed bits (one bit per weight).

The masked rows are recomputed as x @ (W * M)^T + b instead of subtracting x @ (W * (1 - M))^T:
same cost, no cancellation error. Per tenant on its own contiguous rows (no slot bank).
"""

from __future__ import annotations

import torch

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.pets.common import layers_of, site_col, weight_count

DEFAULT_SITES = list(LINEAR_SITES)


def tenant_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
    sites = delta.config.get("sites", DEFAULT_SITES)
    return {f"{i}.{s}.bits": t[f"layers.{i}.{s}.mask_bits"]
            for i in layers_of(delta.config, dims) for s in sites}


def tenant_bytes(cfg: dict, dims: BaseDims, elem_bytes: int, density: float) -> int:
    """Device bytes of one tenant's masks: one bit per weight of each masked site."""
    return (weight_count(cfg, dims, DEFAULT_SITES) + 7) // 8


def unpack_mask(bits: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    m = (bits.unsqueeze(1) >> shifts) & 1  # little bit order: bit k of byte j is element 8j + k
    return m.reshape(-1)[:out_f * in_f].reshape(out_f, in_f).to(torch.bool)


def linear_touches(group, site_group: str) -> bool:
    return True


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer, enc) -> None:
    for res, t0, t1 in group.tenants:
        d = res.sparse
        for s in ("q", "k", "v") if site_group == "qkv" else (site_group,):
            bits = d.get(f"{layer}.{s}.bits")
            if bits is None:
                continue
            w, b = base_layer.site_weight(s)
            wm = w * unpack_mask(bits, *w.shape).to(w.dtype)
            c = site_col(s, enc.dims)
            y[t0:t1, c:c + w.shape[0]] = torch.addmm(b, x[t0:t1], wm.t())
