"""Two-layer sequence-classification heads (RoBERTa / DistilBERT style: dense + tanh|relu +
classifier) mixed in one batch with one-layer heads: same and different label buckets, every
pooling, token heads, several PET types; each row equals the independent single-tenant reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.conftest import Reference, check_outputs, dims_of, random_batch, random_delta
from workers.engine.errors import AdapterLoadError
from workers.engine.runtime import Engine


def test_one_and_two_layer_heads_mix_in_one_batch(tiny_bert_dir):
    dims = dims_of(tiny_bert_dir)
    rng = np.random.default_rng(11)
    specs = [  # (pet, head activation or None, n_labels, pooling / task)
        ("lora", "tanh", 2, "cls"), ("ia3", "tanh", 3, "cls"), ("lora", None, 2, "cls"),
        ("bitfit", "relu", 2, "cls"), ("adapter", "relu", 6, "mean"), ("lora", "tanh", 5, "pooler"),
        ("ia3", None, 3, "pooler"), ("diff", "relu", 3, "cls"), ("lora", None, 4, "token_cls"),
        ("maskbert", "tanh", 2, "mean"),
    ]
    deltas = {}
    for k, (pet, act, n, pool) in enumerate(specs):
        tid = f"t{k}-{pet}-{act or 'one'}"
        kw = {"task": "token_cls"} if pool == "token_cls" else {"task": "seq_cls", "pooling": pool}
        if act:
            kw["head_activation"] = act
        deltas[tid] = random_delta(tid, pet, dims, rng, n_labels=n, **kw)
    batch = random_batch(list(deltas), rng, vocab=120, seqs_per_tenant=(1, 4))
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu", dtype=torch.float32)
    try:
        outs = eng.run(batch, timeout=120)
        keys = {r.head_bank.key for r in eng.pool.residents.values()}
    finally:
        eng.close()
    # one bank per (head kind, label bucket): the batch held eight head groups
    assert keys == {"head:c2", "head:c4", "head2:tanh:c2", "head2:tanh:c4", "head2:tanh:c8", "head2:relu:c2",
                    "head2:relu:c4", "head2:relu:c8"}, keys
    worst = check_outputs(outs, batch, deltas, Reference(tiny_bert_dir))
    print(f"mixed one/two-layer heads: worst relative error {worst:.2e}")


def test_two_layer_head_needs_its_dense_and_seq_cls(tiny_bert_dir):
    dims = dims_of(tiny_bert_dir)
    rng = np.random.default_rng(3)
    d = random_delta("a", "lora", dims, rng, task="seq_cls", pooling="cls", head_activation="tanh")
    del d.tensors["head.dense.bias"]
    bad_act = random_delta("b", "lora", dims, rng, task="seq_cls", pooling="cls", head_activation="tanh")
    bad_act.config["head"]["activation"] = "gelu"
    tok = random_delta("c", "lora", dims, rng, task="token_cls", head_activation="relu")
    deltas = {"a": d, "b": bad_act, "c": tok}
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu", dtype=torch.float32)
    try:
        for tid, msg in (("a", "head.dense.bias"), ("b", "config.head.activation"), ("c", "seq_cls only")):
            got = eng.pool.acquire([tid])[tid]
            assert isinstance(got, AdapterLoadError) and msg in str(got), (tid, got)
    finally:
        eng.close()
