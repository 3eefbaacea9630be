"""TenantDelta -> HostDelta: validated, converted to bank layout, engine dtype, pinned host memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from schema.layout import BaseDims
from workers.engine import heads
from workers.engine.bank import BankLayout
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError
from workers.engine.pets.common import checked_tensors
from workers.engine.pets.registry import PETS


@dataclass(eq=False)
class TenantMeta:
    """What a converted tenant is: shared by its host copy (HostDelta) and its device copy (Resident)."""

    tenant_id: str
    version: int | str
    pet_type: str
    task: str
    pooling: str
    labels: list[str]


@dataclass
class HostDelta(TenantMeta):
    bank_layout: BankLayout | None
    bank_tensors: dict[str, torch.Tensor] | None
    head_layout: BankLayout
    head_tensors: dict[str, torch.Tensor]
    sparse: dict[str, torch.Tensor] | None
    nbytes: int  # host memory it holds (host_footprint of its allocations): the host tier's budget unit


def host_footprint(nbytes: int, pinned: bool) -> int:
    """Host bytes one allocation of ``nbytes`` really holds: torch's caching host allocator hands
    out pinned blocks rounded up to a power of two (a MiniLM LoRA r8 tenant's 146 KiB takes 256 KiB),
    so the host tier's byte budget counts that, not the tensors' own size."""
    return 1 << (nbytes - 1).bit_length() if pinned and nbytes > 1 else nbytes


def _pinned_pack(parts: list[dict[str, torch.Tensor] | None], dtype: torch.dtype,
                 pin: bool) -> tuple[list[dict[str, torch.Tensor] | None], int]:
    """Cast the float tensors of every part to dtype and pack them into one (pinned) buffer:
    one allocation per tenant, so one rounding-up. Integer tensors (masks, indices) keep their
    dtype in allocations of their own. Returns the packed parts and their host footprint."""
    total = sum(t.numel() for d in parts if d for t in d.values() if t.is_floating_point())
    flat = torch.empty(total, dtype=dtype, pin_memory=pin)
    footprint = host_footprint(flat.numel() * flat.element_size(), pin)
    out: list[dict[str, torch.Tensor] | None] = []
    off = 0
    for d in parts:
        if d is None:
            out.append(None)
            continue
        packed = {}
        for n, t in d.items():
            if t.is_floating_point():
                v = flat[off:off + t.numel()].view(t.shape)
                v.copy_(t)
                off += t.numel()
            else:
                v = t.contiguous().pin_memory() if pin else t.contiguous()
                footprint += host_footprint(v.numel() * v.element_size(), pin)
            packed[n] = v
        out.append(packed)
    return out, footprint


def to_host(delta: TenantDelta, dims: BaseDims, dtype: torch.dtype, pin: bool, has_pooler: bool) -> HostDelta:
    t = checked_tensors(delta, dims)
    cfg = delta.config
    task = cfg["task"]
    pooling = cfg.get("pooling", "cls") if task == "seq_cls" else "cls"
    if task == "seq_cls" and pooling == "pooler" and not has_pooler:
        raise AdapterLoadError(f"tenant {delta.tenant_id}: pooling 'pooler' but the base model has no pooler")
    try:
        head_layout = heads.bank_layout(cfg, dims)
        head_t = heads.slot_tensors(delta, t, dims, head_layout)
        bank_layout = bank_t = sp = None
        pet = PETS[delta.pet_type]  # checked_tensors accepted it: a registered type
        if pet.banked:
            bank_layout = pet.ops.bank_layout(cfg, dims)
            bank_t = pet.ops.slot_tensors(delta, t, dims, bank_layout)
        else:
            sp = pet.ops.tenant_tensors(delta, t, dims)
        (bank_t, head_t, sp), nbytes = _pinned_pack([bank_t, head_t, sp], dtype, pin)
    except AdapterLoadError:
        raise
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise AdapterLoadError(f"tenant {delta.tenant_id}: cannot convert delta: {e}") from e
    return HostDelta(delta.tenant_id, delta.version, delta.pet_type, task, pooling, list(cfg["labels"]),
                     bank_layout, bank_t, head_layout, head_t, sp, nbytes)
