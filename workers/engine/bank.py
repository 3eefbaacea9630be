"""Stacked device slot tensors: one bank per (PET type, shape bucket), one slot per tenant."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch


@dataclass(frozen=True)
class SlotSpec:
    """One stacked tensor of a bank: per-slot shape, whether dim 0 is the layer, value when absent."""

    shape: tuple[int, ...]
    per_layer: bool = True
    fill: float = 0.0


@dataclass
class BankLayout:
    key: str
    pet_type: str
    specs: dict[str, SlotSpec]
    extra: dict = field(default_factory=dict)

    def slot_elems(self) -> int:
        return sum(prod(s.shape) for s in self.specs.values())


class SlotBank:
    """``tensors[name]`` is ``[slots, *spec.shape]``; tenants are rows gathered by slot index."""

    def __init__(self, layout: BankLayout, slots: int, device: torch.device, dtype: torch.dtype):
        self.layout = layout
        self.key = layout.key
        self.pet_type = layout.pet_type
        self.extra = layout.extra
        self.slots = slots
        self.device = device
        self.dtype = dtype
        self.tensors = {n: torch.full((slots, *s.shape), s.fill, device=device, dtype=dtype)
                        for n, s in layout.specs.items()}

    def slot_bytes(self) -> int:
        return self.layout.slot_elems() * torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        return self.slot_bytes() * self.slots

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)
