"""The trainer (issue 12): every PET type trains, registers like an import, and the engine serves
exactly what the trainer evaluated (fp32, 1e-4); bad data fails with one clear line.

Real PostgreSQL (the adapter store), a tiny random BERT with MiniLM's tokenizer (seconds per type).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from schema.pet import PET_TYPES
from workers.adapters.store import AdapterStore, make_backend
from workers.engine.batch import PackedBatch
from workers.engine.pets.maskbert import unpack_mask
from workers.engine.runtime import Engine
from workers.serving.adapter_source import StoreLoader
from workers.tenants import TenantRegistry
from workers.trainer.core import TrainDataError, TrainSpec, load_examples, register, train

torch.set_num_threads(2)

# Small but non-default PET options, so configs other than the defaults are exercised too.
PET_OPTIONS = {
    "lora": {"r": 4, "alpha": 8, "sites": ["q", "v", "ffn_in"]},
    "adapter": {"variant": "houlsby", "bottleneck": 8},
    "bitfit": {},
    "ia3": {"sites": ["k", "v", "ffn_in"]},
    "diff": {"density": 0.05, "retrain_epochs": 1},
    "maskbert": {"init_sparsity": 0.05},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_dir):
    """A 2-layer BERT (random weights) that reads MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel
    d = tmp_path_factory.mktemp("tiny_trainable")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir, f), d)
    return str(d)


def _rows(n=36):
    words = {"pos": "great lovely superb", "neg": "awful broken terrible", "neu": "okay average plain"}
    return [{"text": f"{words[y].split()[i % 3]} service number {i}", "label": y,
             **({"text_pair": "a pair"} if i % 5 == 0 else {})}
            for i in range(n) for y in ("pos", "neg", "neu")][:n]


@pytest.fixture()
def store(sessions, tmp_path):
    return AdapterStore(sessions, make_backend("postgres", tmp_path / "blobs"))


def _serve(model_dir, store, tenant, result):
    """The engine exactly as the worker runs it: the store's loader, a packed batch of the rows."""
    ids, tts = result.eval_token_ids, result.eval_token_type_ids
    batch = PackedBatch(input_ids=np.concatenate([np.asarray(x) for x in ids]),
                        cu_seqlens=np.concatenate([[0], np.cumsum([len(x) for x in ids])]),
                        tenant_ids=[tenant] * len(ids),
                        token_type_ids=np.concatenate([np.asarray(x) for x in tts]) if tts else None)
    eng = Engine(model_dir, StoreLoader(store, model_dir), device="cpu", dtype=torch.float32)
    try:
        return eng.run(batch, timeout=120)
    finally:
        eng.close()


@pytest.mark.parametrize("pet", PET_TYPES)
def test_trained_delta_is_served_as_evaluated(pet, tiny_dir, store, sessions, unique):
    spec = TrainSpec(pet_type=pet, pet_config=PET_OPTIONS[pet], epochs=2, batch_size=8, max_length=24,
                     pooling=["mean", "cls", "pooler"][PET_TYPES.index(pet) % 3], val_split=0.25, seed=1)
    seen = []
    result = train(tiny_dir, load_examples(_rows()), spec, progress=seen.append)
    assert result.config["labels"] == ["neg", "neu", "pos"]
    assert result.eval_logits.shape == (9, 3) and result.metrics["val_rows"] == 9
    assert {p.phase for p in seen} >= {"train"} and any(p.val_macro_f1 is not None for p in seen)
    m = result.metrics
    assert sum(c["support"] for c in m["per_label"].values()) == 9 and 0 <= m["macro_f1"] <= 1
    assert m["bytes"] == sum(t.numel() * t.element_size() for t in result.tensors.values())

    tenant = TenantRegistry(sessions).create(f"tr-{pet}-{unique}").tenant_id
    rec = register(result, tenant, store=store)
    assert rec.version == 1 and rec.pet_type == pet
    out = _serve(tiny_dir, store, tenant, result)
    served = torch.from_numpy(out.logits[:, :3])
    assert torch.allclose(served, result.eval_logits, atol=1e-4, rtol=0), \
        (served - result.eval_logits).abs().max()
    assert out[0].label == result.config["labels"][int(result.eval_logits[0].argmax())]


def test_sparse_types_learn_their_sparsity(tiny_dir):
    ex = load_examples(_rows())
    # Diff-pruning: the kept entries are the largest of the learned dense delta, at the density.
    r = train(tiny_dir, ex, TrainSpec(pet_type="diff", pet_config={"density": 0.02, "retrain_epochs": 0},
                                      epochs=1, batch_size=8, max_length=24))
    idx, val = r.tensors["layers.0.ffn_in.delta_index"], r.tensors["layers.0.ffn_in.delta_value"]
    assert idx.numel() == val.numel() == int(np.ceil(0.02 * 64 * 32)) and idx.dtype == torch.int64
    assert bool((val.abs() > 0).all())
    # MaskBERT: from an all-ones mask (no random zeros), scores cross the threshold where the
    # gradient says so: the exported mask is learned, not a pattern.
    r = train(tiny_dir, ex, TrainSpec(pet_type="maskbert", pet_config={"init_sparsity": 0.0}, lr=5e-3,
                                      epochs=2, batch_size=8, max_length=24))
    m = unpack_mask(r.tensors["layers.0.q.mask_bits"], 32, 32)
    assert 0.0 < r.metrics["mask_sparsity"] < 0.9 and not bool(m.all())


def test_bad_data_is_refused_with_a_reason(tmp_path, tiny_dir):
    with pytest.raises(TrainDataError, match="empty"):
        load_examples([])
    with pytest.raises(TrainDataError, match=r"row 2: missing column\(s\) \['label'\]"):
        load_examples([{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(TrainDataError, match="tokens but"):
        load_examples([{"tokens": ["a", "b"], "tags": ["O"]}], task="token_cls")
    with pytest.raises(TrainDataError, match="exceeds the limit"):
        load_examples(_rows(), max_rows=10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(TrainDataError, match="bad.jsonl:2: not JSON"):
        load_examples(bad)
    with pytest.raises(TrainDataError, match=r"labels not in the label set .*\['neu'\]"):
        train(tiny_dir, load_examples(_rows()), TrainSpec(labels=["neg", "pos"], epochs=1))
    with pytest.raises(TrainDataError, match="at least 2 distinct labels"):
        train(tiny_dir, load_examples([{"text": f"t{i}", "label": "a"} for i in range(6)]), TrainSpec(epochs=1))
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello,a\nworld,b\n")
    assert load_examples(csv).labels == ["a", "b"]


def test_token_classification_is_served_as_evaluated(tiny_dir, store, sessions, unique):
    rows = [{"tokens": ["the", "acme", "shop", "in", "paris"][: 3 + i % 3],
             "tags": ["O", "ORG", "ORG", "O", "LOC"][: 3 + i % 3]} for i in range(24)]
    result = train(tiny_dir, load_examples(rows, task="token_cls"),
                   TrainSpec(pet_type="lora", task="token_cls", epochs=1, batch_size=8, max_length=24))
    tenant = TenantRegistry(sessions).create(f"tr-tok-{unique}").tenant_id
    register(result, tenant, store=store)
    out = _serve(tiny_dir, store, tenant, result)
    probs = torch.softmax(result.eval_logits, -1)
    served = torch.stack([torch.tensor(out[r].token_scores[j]) for r, j in result.eval_index])
    assert torch.allclose(served, probs, atol=1e-4)


def test_cli_train_registers_and_writes_metrics(tmp_path, tiny_dir, sessions, database_url, unique):
    tenant = TenantRegistry(sessions).create(f"tr-cli-{unique}").tenant_id
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows()))
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url, "FLOCK_STORE_BACKEND": "postgres"}
    cmd = [sys.executable, "-m", "workers.cli", "adapter", "train", tenant, str(data), "--pet", "ia3",
           "--base-model", tiny_dir, "--epochs", "1", "--max-length", "24", "--no-activate",
           "--metrics", str(tmp_path / "m.json"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["version"] == 1 and doc["active"] is False and doc["pet_type"] == "ia3"
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == doc["accuracy"]
    with sessions() as s:
        from schema.tables import Tenant
        assert s.get(Tenant, tenant).active_version is None  # --no-activate
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    p = subprocess.run(cmd[:6] + [str(bad)] + cmd[7:], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("error: row 1: missing column(s) ['label']")
    assert len(p.stderr.strip().splitlines()) == 1
