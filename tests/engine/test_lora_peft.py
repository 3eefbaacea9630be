"""LoRA on the real MiniLM: 50 PEFT adapters (mixed ranks) converted to Flock's layout, one mixed
batch tokenised by the engine's helper, compared with PEFT itself running each adapter alone."""

import numpy as np
import torch

from workers.engine.batch import RequestItem, TenantDelta
from workers.engine.runtime import Engine
from workers.engine.tokenize import BatchTokenizer

from .conftest import rel_err

PEFT_SITE = {"query": "q", "value": "v", "key": "k"}


def test_peft_lora_mixed_batch_matches_peft(minilm_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = AutoModel.from_pretrained(minilm_dir).eval()
    n, h = 50, base.config.hidden_size
    model = None
    deltas = {}
    for j in range(n):
        r = [4, 8, 16][j % 3]
        targets = ["query", "value"] if j % 2 else ["query", "key", "value"]
        cfg = LoraConfig(r=r, lora_alpha=2 * r if j % 4 else 16, target_modules=targets, lora_dropout=0.0)
        name = f"a{j}"
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        labels = [f"c{k}" for k in range(2 + j % 5)]
        t = {}
        for i, layer in enumerate(model.base_model.model.encoder.layer):
            for mod_name in targets:
                mod = getattr(layer.attention.self, mod_name)
                with torch.no_grad():
                    mod.lora_B[name].weight.normal_(0, 0.05)  # PEFT inits B = 0: make it matter
                t[f"layers.{i}.{PEFT_SITE[mod_name]}.lora_A"] = mod.lora_A[name].weight.detach().clone()
                t[f"layers.{i}.{PEFT_SITE[mod_name]}.lora_B"] = mod.lora_B[name].weight.detach().clone()
        t["head.weight"] = torch.randn(len(labels), h) * 0.3
        t["head.bias"] = torch.randn(len(labels)) * 0.1
        deltas[f"tenant-{j}"] = TenantDelta(f"tenant-{j}", 3, "lora", {
            "task": "seq_cls", "labels": labels, "pooling": ["cls", "mean", "pooler"][j % 3], "r": r,
            "alpha": cfg.lora_alpha, "sites": [PEFT_SITE[m] for m in targets]}, t)
    model.eval()
    words = "the quick brown fox jumps over lazy dogs while tenants share one encoder".split()
    items = []
    for k in range(64):
        tid = f"tenant-{int(rng.integers(n)) if k >= n else k}"
        text = " ".join(rng.choice(words, size=int(rng.integers(2, 30))))
        items.append(RequestItem(tid, text=text, text_pair="second part" if k % 5 == 0 else None, request_id=k))
    batch = BatchTokenizer(minilm_dir, max_length=64).pack(items)
    eng = Engine(minilm_dir, lambda tid: deltas[tid], device="cpu")
    try:
        outs = eng.run(batch, timeout=120)
    finally:
        eng.close()
    cu = batch.cu_seqlens.tolist()
    worst = 0.0
    for i, o in enumerate(outs):
        assert o.error is None and o.request_id == i and o.adapter_version == 3
        d = deltas[o.tenant_id]
        model.set_adapter(f"a{o.tenant_id.split('-')[1]}")
        with torch.no_grad():
            out = model(input_ids=batch.input_ids[cu[i]:cu[i + 1]][None],
                        token_type_ids=batch.token_type_ids[cu[i]:cu[i + 1]][None])
        hid = out.last_hidden_state[0]
        pooled = {"cls": hid[0], "mean": hid.mean(0), "pooler": out.pooler_output[0]}[d.config["pooling"]]
        want = pooled @ d.tensors["head.weight"].T + d.tensors["head.bias"]
        err = rel_err(o.logits, want)
        worst = max(worst, err)
        assert err <= 1e-4, (i, err)
        assert o.label == d.config["labels"][int(want.argmax())]
