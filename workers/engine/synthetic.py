"""Synthetic checkpoints and tenant deltas for benchmarks and GPU checks (not for tests' references)."""

from __future__ import annotations

import numpy as np
import torch

from schema.layout import ADAPTER_PLACEMENTS, LINEAR_SITES, BaseDims
from workers.engine.batch import PackedBatch, TenantDelta


def save_random_bert(path: str, hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522,
                     max_pos=512, seed=0, std=0.02) -> str:
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_pos)
    m = BertModel(cfg)
    if std != 0.02:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0, std)
    m.save_pretrained(path, safe_serialization=True)
    return path


def random_delta(tid: str, pet: str, dims: BaseDims, seed: int, n_labels: int = 2, r: int = 8,
                 sites=None, scale: float = 0.05, task: str = "seq_cls", pooling: str = "cls",
                 density: float = 0.01, bottleneck: int = 64, head_activation: str | None = None) -> TenantDelta:
    """``head_activation`` ("tanh" | "relu", seq_cls): a two-layer head (dense + activation + linear)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=scale):
        return torch.randn(*shape, generator=g) * s
    cfg = {"task": task, "labels": [f"l{j}" for j in range(n_labels)]}
    if task == "seq_cls":
        cfg["pooling"] = pooling
    t = {}
    L = range(dims.layers)
    if pet == "lora":
        sites = sites or ["q", "v"]
        cfg.update(r=r, alpha=2 * r, sites=sites)
        for i in L:
            for s in sites:
                o, n = dims.site_shape(s)
                t[f"layers.{i}.{s}.lora_A"] = rnd(r, n)
                t[f"layers.{i}.{s}.lora_B"] = rnd(o, r)
    elif pet == "adapter":
        cfg.update(variant="houlsby", bottleneck=bottleneck, activation="gelu")
        for i in L:
            for p in ADAPTER_PLACEMENTS["houlsby"]:
                t[f"layers.{i}.adapter_{p}.down.weight"] = rnd(bottleneck, dims.hidden)
                t[f"layers.{i}.adapter_{p}.down.bias"] = rnd(bottleneck)
                t[f"layers.{i}.adapter_{p}.up.weight"] = rnd(dims.hidden, bottleneck)
                t[f"layers.{i}.adapter_{p}.up.bias"] = rnd(dims.hidden)
    elif pet == "bitfit":
        for i in L:
            for s in LINEAR_SITES:
                t[f"layers.{i}.{s}.bias"] = rnd(dims.site_shape(s)[0])
            for ln in ("attn_ln", "ffn_ln"):
                t[f"layers.{i}.{ln}.weight"] = rnd(dims.hidden)
                t[f"layers.{i}.{ln}.bias"] = rnd(dims.hidden)
    elif pet == "ia3":
        for i in L:
            for s in ("k", "v", "ffn_in"):
                t[f"layers.{i}.{s}.scale"] = 1 + rnd(dims.site_shape(s)[0])
    elif pet == "diff":
        rng = np.random.default_rng(seed)
        for i in L:
            for s in LINEAR_SITES:
                o, n = dims.site_shape(s)
                nnz = max(1, int(o * n * density))
                t[f"layers.{i}.{s}.delta_index"] = torch.from_numpy(rng.choice(o * n, nnz, replace=False))
                t[f"layers.{i}.{s}.delta_value"] = rnd(nnz)
    elif pet == "maskbert":
        rng = np.random.default_rng(seed)
        for i in L:
            for s in LINEAR_SITES:
                o, n = dims.site_shape(s)
                t[f"layers.{i}.{s}.mask_bits"] = torch.from_numpy(
                    np.packbits((rng.random(o * n) > 0.1).astype(np.uint8), bitorder="little"))
    else:
        raise ValueError(pet)
    if head_activation is not None:
        cfg["head"] = {"layers": 2, "activation": head_activation}
        t["head.dense.weight"] = rnd(dims.hidden, dims.hidden, s=dims.hidden ** -0.5)
        t["head.dense.bias"] = rnd(dims.hidden, s=0.1)
    t["head.weight"] = rnd(n_labels, dims.hidden, s=0.5)
    t["head.bias"] = rnd(n_labels, s=0.1)
    return TenantDelta(tid, 1, pet, cfg, t)


def random_packed(tenants: list[str], lengths, vocab: int, seed: int = 0) -> PackedBatch:
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in lengths]
    ids = torch.from_numpy(rng.integers(1000 if vocab > 2000 else 1, vocab, size=sum(lengths)))
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.long)
    return PackedBatch(ids, cu, list(tenants), None, list(range(len(tenants))))
