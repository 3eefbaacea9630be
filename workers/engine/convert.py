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
    nbytes: int


def _pinned_pack(tensors: dict[str, torch.Tensor], dtype: torch.dtype, pin: bool) -> dict[str, torch.Tensor]:
    """Cast floats to dtype and pack them into one (pinned) buffer: one allocation per tenant."""
    total = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    flat = torch.empty(total, dtype=dtype, pin_memory=pin)
    out, off = {}, 0
    for n, t in tensors.items():
        if t.is_floating_point():
            v = flat[off:off + t.numel()].view(t.shape)
            v.copy_(t)
            off += t.numel()
            out[n] = v
        else:
            out[n] = t.contiguous().pin_memory() if pin else t.contiguous()
    return out


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
            bank_t = _pinned_pack(pet.ops.slot_tensors(delta, t, dims, bank_layout), dtype, pin)
        else:
            sp = _pinned_pack(pet.ops.tenant_tensors(delta, t, dims), dtype, pin)
    except AdapterLoadError:
        raise
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise AdapterLoadError(f"tenant {delta.tenant_id}: cannot convert delta: {e}") from e
    head_t = _pinned_pack(head_t, dtype, pin)
    nbytes = sum(x.numel() * x.element_size() for d in (bank_t, head_t, sp) if d for x in d.values())
    return HostDelta(delta.tenant_id, delta.version, delta.pet_type, task, pooling, list(cfg["labels"]),
                     bank_layout, bank_t, head_layout, head_t, sp, nbytes)
