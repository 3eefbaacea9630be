"""Every PET type the engine serves, one entry each: what the encoder, the plan, the converter,
the size table and the balancer ask about a type instead of branching on its name.

Adding a PET type: its name in ``schema/pet.PET_TYPES`` (the wire / database contract) and its
tensors in ``schema/layout.py``; one module in this package implementing its hooks and tensor
layout (see ``HOOKS`` and ``PetType``); one line in ``PETS`` below. docs/engine.md "Adding a PET type".

This module imports no torch: ``workers.config`` reads the default cost weights from it on the
Kafka side. A type's ops module is imported on first use of ``PetType.ops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import import_module
from types import ModuleType

from schema.pet import PET_TYPES

# Points of the encoder layer a PET type can act at: hook -> the functions its ops module defines.
# Each is called once per PET group of that type (``g``: plan.PetGroup, ``i``: layer) and touches
# only the group's rows; ``enc`` is the Encoder (``dims``, ``options``, ``tuned``).
HOOKS = {
    # after each shared GEMM: linear(g, i, site_group, x, y, layer_weights, enc) adds the delta to
    # y = x W^T + b (site_group qkv | attn_out | ffn_in | ffn_out); linear_touches(g, site_group)
    # says whether it changes that output (the fused FFN-in + GELU path needs no group to)
    "linear": ("linear", "linear_touches"),
    # linear_init(g, i, site_group, x, y, bias) writes bias + delta before the base GEMM
    # accumulates into y (FLOCK_LORA_INTO_GEMM); can_init(groups, site_group) says if it can
    "linear_init": ("can_init", "linear_init"),
    # gemm_ok(g, site_group, x) / linear_gemm(g, i, site_group, x, w, b) -> y: the whole site
    # group output x W^T + b with this group's delta added in the GEMM's epilogue (FLOCK_LORA_GEMM)
    "linear_gemm": ("gemm_ok", "linear_gemm"),
    # linear(..., act="gelu_tanh"): the delta and the FFN activation in one row-wise pass
    "linear_act": ("linear",),
    # its linear() writes the group's rows of every site group's output entirely (x W'^T + b):
    # the shared GEMM skips those rows (MaskBERT: one product per row instead of two)
    "linear_replace": (),
    # scale(g, i, name, y): named per-feature scales between the ops (module doc of pets/ia3.py);
    # scales(g, name): whether the group has that scale
    "scale": ("scale", "scales"),
    # qkv_input(g, i, x, qkv, layer_weights, enc): q / k / v input scaling (recomputed columns)
    "qkv_input": ("qkv_input",),
    # output(g, i, "attn" | "ffn", h): after the attention / FFN output dense, before residual + LN
    "output": ("output",),
    # layer_norm(g, i, ln_site, pre, out, w, b, eps): LayerNorm affine deltas; ln_delta(g, i,
    # ln_site): the same as per-row (gamma, beta) deltas for the fused add + LayerNorm kernel
    "layer_norm": ("layer_norm", "ln_delta"),
}


@dataclass(frozen=True)
class PetType:
    """One PET type.

    ``banked``: tenants of one shape share slot banks (ops define ``bank_layout(cfg, dims)`` and
    ``slot_tensors(delta, tensors, dims, layout)``) and are batched per bank; otherwise each tenant
    keeps its own device tensors (ops define ``tenant_tensors(delta, tensors, dims)``) and its ops
    run per tenant on its own rows. ``cost_weight``: relative cost of one of its tokens for the
    balancer (the shared GEMMs cost 1; ``FLOCK_PET_COST_WEIGHTS`` overrides it).
    """

    name: str
    hooks: tuple[str, ...]  # the encoder points it touches (keys of HOOKS)
    banked: bool
    cost_weight: float

    @cached_property
    def ops(self) -> ModuleType:
        mod = import_module(f"{__package__}.{self.name}")
        needed = [f for h in self.hooks for f in HOOKS[h]]
        needed += ["bank_layout", "slot_tensors"] if self.banked else ["tenant_tensors"]
        missing = [f for f in needed if not callable(getattr(mod, f, None))]
        if missing:
            raise TypeError(f"PET type {self.name!r}: {mod.__name__} lacks {missing}")
        return mod


# Registry order is the plan's group order (LoRA rows first, ... MaskBERT last).
PETS: dict[str, PetType] = {p.name: p for p in (
    PetType("lora", ("linear", "linear_init", "linear_gemm"), banked=True, cost_weight=1.05),
    PetType("adapter", ("output",), banked=True, cost_weight=1.10),
    PetType("bitfit", ("linear", "linear_act", "layer_norm"), banked=True, cost_weight=1.0),
    PetType("ia3", ("scale", "qkv_input"), banked=True, cost_weight=1.0),
    PetType("diff", ("linear",), banked=False, cost_weight=1.25),
    PetType("maskbert", ("linear", "linear_replace"), banked=False, cost_weight=1.20),
)}

if tuple(PETS) != PET_TYPES:  # the contract's list and the engine's must agree, same order
    raise ImportError(f"PET registry {tuple(PETS)} does not match schema.pet.PET_TYPES {PET_TYPES}")
if any(set(p.hooks) - set(HOOKS) for p in PETS.values()):
    raise ImportError("a PET type names a hook the encoder does not have")


def default_cost_weights() -> dict[str, float]:
    return {n: p.cost_weight for n, p in PETS.items()}


def with_hook(hook: str) -> dict[str, ModuleType]:
    """PET type -> ops module, for the types acting at ``hook``."""
    return {n: p.ops for n, p in PETS.items() if hook in p.hooks}
