"""Helpers shared by the PET converters."""

from __future__ import annotations

import math

import torch

from schema.layout import BaseDims, LayoutError, cells, expected_tensors, optional_tensors
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError

# Output groups of the encoder's shared GEMMs: q, k, v share one fused GEMM (columns q | k | v).
SITE_GROUP = {"q": "qkv", "k": "qkv", "v": "qkv", "attn_out": "attn_out", "ffn_in": "ffn_in",
              "ffn_out": "ffn_out"}
GROUPS = ("qkv", "attn_out", "ffn_in", "ffn_out")


def group_out(group: str, dims: BaseDims) -> int:
    h, m = dims.hidden, dims.intermediate
    return {"qkv": 3 * h, "attn_out": h, "ffn_in": m, "ffn_out": h}[group]


def group_in(group: str, dims: BaseDims) -> int:
    return dims.intermediate if group == "ffn_out" else dims.hidden


def site_col(site: str, dims: BaseDims) -> int:
    """First column of a site inside its group's output."""
    return "qkv".index(site) * dims.hidden if site in ("q", "k", "v") else 0


def layers_of(cfg: dict, dims: BaseDims) -> list[int]:
    return sorted(cfg.get("layers") or range(dims.layers))


def weight_count(cfg: dict, dims: BaseDims, default_sites) -> int:
    """Base weights under a per-tenant delta (``sites`` x ``layers``): what its size scales with."""
    per_layer = sum(dims.site_shape(s)[0] * dims.site_shape(s)[1] for s in cfg.get("sites", default_sites))
    return per_layer * len(layers_of(cfg, dims))


def cells_of(cfg: dict, dims: BaseDims, entries: list[str]) -> list[tuple[int, str]]:
    """(layer, entry) cells of a LoRA / IA3 delta (``site_layers`` or ``sites`` x ``layers``)."""
    try:
        return cells(cfg, dims, entries)
    except LayoutError as e:
        raise AdapterLoadError(str(e)) from e


def next_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise AdapterLoadError(f"{n} exceeds the largest bucket {buckets[-1]}")


def all_finite(flat: torch.Tensor) -> bool:
    if flat.numel() == 0:
        return True
    lo, hi = torch.aminmax(flat)  # NaN propagates into both
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def checked_tensors(delta: TenantDelta, dims: BaseDims) -> dict[str, torch.Tensor]:
    """Validate against the canonical layout; returns fp32 CPU tensors (int/uint8 kept as is)."""
    try:
        required = expected_tensors(delta.pet_type, delta.config, dims)
        optional = optional_tensors(delta.pet_type, delta.config, dims)
    except LayoutError as e:
        raise AdapterLoadError(f"tenant {delta.tenant_id}: {e}") from e
    specs = {s.name: s for s in required + optional}
    missing = [s.name for s in required if s.name not in delta.tensors]
    unknown = [n for n in delta.tensors if n not in specs]
    if missing or unknown:
        raise AdapterLoadError(f"tenant {delta.tenant_id}: missing {missing[:4]} unknown {unknown[:4]}")
    out = {}
    for name, t in delta.tensors.items():
        spec = specs[name]
        t = torch.as_tensor(t).detach().cpu()
        if spec.shape is not None and tuple(t.shape) != spec.shape:
            raise AdapterLoadError(f"tenant {delta.tenant_id}: {name} has shape {tuple(t.shape)}, "
                                   f"expected {spec.shape}")
        if spec.dtype == "float":
            if not t.is_floating_point():
                raise AdapterLoadError(f"tenant {delta.tenant_id}: {name} must be float")
            t = t.float()
        elif spec.dtype == "int":
            if t.is_floating_point() or t.dtype == torch.bool:
                raise AdapterLoadError(f"tenant {delta.tenant_id}: {name} must be integer")
            t = t.long()
        elif spec.dtype == "uint8" and t.dtype != torch.uint8:
            raise AdapterLoadError(f"tenant {delta.tenant_id}: {name} must be uint8")
        out[name] = t
    # One finiteness check over all float tensors, by min/max (NaN and inf show there; ~10x
    # cheaper than isfinite on CPU, and one op instead of one per tensor): this is on a cold
    # miss's path. Only a failure looks for the culprit.
    floats = [t for n, t in out.items() if specs[n].dtype == "float"]
    if floats and not all_finite(torch.cat([t.reshape(-1) for t in floats])):
        bad = next(n for n, t in out.items() if specs[n].dtype == "float" and not bool(torch.isfinite(t).all()))
        raise AdapterLoadError(f"tenant {delta.tenant_id}: {bad} has non-finite values")
    return out
