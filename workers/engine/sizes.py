"""Bytes per tenant on the device for each PET type (slot bytes of its bank + its head slot)."""

from __future__ import annotations

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine import heads
from workers.engine.pets.registry import PETS

BERT_BASE = BaseDims(hidden=768, intermediate=3072, layers=12, heads=12)


def bytes_per_tenant(pet_type: str, cfg: dict, dims: BaseDims = BERT_BASE, elem_bytes: int = 2,
                     density: float = 0.01) -> int:
    """Device bytes of one tenant. diff: nonzeros at ``density`` (int32 code + value);
    maskbert: 1 bit per weight of each masked site. Includes the task head slot."""
    if pet_type not in PETS:
        raise ValueError(pet_type)
    head = heads.bank_layout(cfg, dims).slot_elems() * elem_bytes
    pet = PETS[pet_type]
    if pet.banked:
        return pet.ops.bank_layout(cfg, dims).slot_elems() * elem_bytes + head
    return pet.ops.tenant_bytes(cfg, dims, elem_bytes, density) + head


def table(dims: BaseDims = BERT_BASE) -> list[tuple[str, int]]:
    two = {"task": "seq_cls", "labels": ["a", "b"]}
    rows = [
        ("lora r8 q,v", bytes_per_tenant("lora", {**two, "r": 8, "sites": ["q", "v"]}, dims)),
        ("lora r16 q,k,v,attn_out", bytes_per_tenant("lora", {**two, "r": 16, "sites": ["q", "k", "v", "attn_out"]}, dims)),
        ("lora r8 all sites", bytes_per_tenant("lora", {**two, "r": 8, "sites": list(LINEAR_SITES)}, dims)),
        ("adapter houlsby b64", bytes_per_tenant("adapter", {**two, "variant": "houlsby", "bottleneck": 64}, dims)),
        ("adapter pfeiffer b64", bytes_per_tenant("adapter", {**two, "variant": "pfeiffer", "bottleneck": 64}, dims)),
        ("bitfit (+LN)", bytes_per_tenant("bitfit", two, dims)),
        ("ia3 k,v,ffn", bytes_per_tenant("ia3", two, dims)),
        ("diff 1% all sites", bytes_per_tenant("diff", two, dims)),
        ("maskbert all sites", bytes_per_tenant("maskbert", two, dims)),
    ]
    return rows


if __name__ == "__main__":
    for name, b in table():
        print(f"{name:28s} {b / 1e6:8.3f} MB (bf16)")
