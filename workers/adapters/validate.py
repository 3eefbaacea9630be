"""Validation of a tenant delta before anything is written: layout, dtypes, finiteness, size.

Parses safetensors only (a format with no code execution); anything else is rejected.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from schema.layout import BaseDims, LayoutError, expected_tensors, optional_tensors

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle / torch zip


class AdapterRejected(ValueError):
    """An adapter that must not be stored or served; the message says why, in one line."""


def parse_safetensors(data: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
    if len(data) > max_bytes:
        raise AdapterRejected(f"adapter file of {len(data)} bytes exceeds the limit of {max_bytes}")
    if data[:2] in PICKLE_MAGIC or data[:4] in PICKLE_MAGIC:
        raise AdapterRejected("pickle/torch.save files are refused: provide safetensors")
    if len(data) < 8:
        raise AdapterRejected("not a safetensors file (too short)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > min(len(data) - 8, 100 * 1024 * 1024):
        raise AdapterRejected("not a safetensors file (bad header length)")
    try:
        return load_safetensors(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise AdapterRejected(f"corrupt safetensors file: {str(exc)[:200]}") from None


def check_delta(pet_type: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                dims: BaseDims) -> None:
    """Raise AdapterRejected unless ``tensors`` is exactly a valid delta for the base model."""
    try:
        required = expected_tensors(pet_type, config, dims)
        optional = optional_tensors(pet_type, config, dims)
    except LayoutError as exc:
        raise AdapterRejected(f"bad config: {exc}") from None
    specs = {s.name: s for s in required + optional}
    missing = [s.name for s in required if s.name not in tensors]
    if missing:
        raise AdapterRejected(f"missing tensors for {pet_type}: {_short(missing)}")
    unexpected = [n for n in tensors if n not in specs]
    if unexpected:
        raise AdapterRejected(f"unexpected tensors for {pet_type}: {_short(unexpected)}")
    for name, t in tensors.items():
        spec = specs[name]
        want = {"float": FLOAT_DTYPES, "int": INT_DTYPES, "uint8": (torch.uint8,)}[spec.dtype]
        if t.dtype not in want:
            raise AdapterRejected(f"{name}: dtype {t.dtype} not allowed (want {spec.dtype})")
        if spec.shape is not None and tuple(t.shape) != spec.shape:
            raise AdapterRejected(f"{name}: shape {tuple(t.shape)} does not match the base model "
                                  f"(expected {spec.shape})")
        if spec.shape is None and t.dim() != 1:
            raise AdapterRejected(f"{name}: must be 1-D")
    # One finiteness check over all float tensors, by min/max (NaN and inf show there; ~10x
    # cheaper than isfinite on CPU, one op instead of one per tensor): a store read on a cold
    # miss runs this. Only a failure looks for the culprit.
    floats = [n for n in tensors if specs[n].dtype == "float"]
    if floats and not _all_finite(torch.cat([tensors[n].reshape(-1) for n in floats])):
        bad = next(n for n in floats if not bool(torch.isfinite(tensors[n]).all()))
        raise AdapterRejected(f"{bad}: contains NaN or Inf")
    if pet_type == "diff":
        _check_sparse(tensors, dims)


def _all_finite(flat: torch.Tensor) -> bool:
    if flat.numel() == 0:
        return True
    lo, hi = torch.aminmax(flat)  # NaN propagates into both
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_sparse(tensors: Mapping[str, torch.Tensor], dims: BaseDims) -> None:
    for name, idx in tensors.items():
        if not name.endswith(".delta_index"):
            continue
        prefix = name[: -len(".delta_index")]
        val = tensors[prefix + ".delta_value"]
        if idx.numel() != val.numel():
            raise AdapterRejected(f"{prefix}: delta_index and delta_value lengths differ")
        out_f, in_f = dims.site_shape(prefix.split(".")[-1])
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out_f * in_f):
            raise AdapterRejected(f"{prefix}: delta_index outside the weight's {out_f}x{in_f} entries")
        if idx.numel() != torch.unique(idx).numel():
            raise AdapterRejected(f"{prefix}: delta_index has duplicates")
        if idx.numel() > math.ceil(0.5 * out_f * in_f):
            raise AdapterRejected(f"{prefix}: more than half of the weight changed; not a sparse delta")


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
