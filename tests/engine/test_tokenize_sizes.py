"""Tokenisation helper and the bytes-per-tenant report."""

import pytest
import torch

from workers.engine.batch import RequestItem
from workers.engine.errors import BatchError
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine
from workers.engine.sizes import BERT_BASE, bytes_per_tenant
from workers.engine.tokenize import BatchTokenizer

from .conftest import dims_of, random_delta


def test_pack_texts_pairs_and_ids(minilm_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(minilm_dir)
    tok = BatchTokenizer(minilm_dir, max_length=8)
    items = [RequestItem("a", text="hello world"), RequestItem("b", token_ids=list(range(100, 120))),
             RequestItem("c", text="a question", text_pair="an answer that is long enough to truncate"),
             RequestItem("a", text="one two three four five six seven eight nine")]
    b = tok.pack(items)
    assert b.tenant_ids == ["a", "b", "c", "a"] and b.num_seqs == 4
    cu = b.cu_seqlens.tolist()
    assert b.input_ids[cu[0]:cu[1]].tolist() == hf("hello world")["input_ids"]
    assert b.input_ids[cu[1]:cu[2]].tolist() == list(range(100, 108))  # truncated to max_length
    pair = hf("a question", "an answer that is long enough to truncate", truncation=True, max_length=8)
    assert b.input_ids[cu[2]:cu[3]].tolist() == pair["input_ids"]
    assert b.token_type_ids[cu[2]:cu[3]].tolist() == pair["token_type_ids"]
    assert cu[4] - cu[3] == 8
    with pytest.raises(BatchError):
        tok.pack([RequestItem("x")])


def test_bytes_per_tenant_matches_pool_slots(tiny_bert_dir):
    import numpy as np
    dims = dims_of(tiny_bert_dir)
    rng = np.random.default_rng(0)
    deltas = {"l": random_delta("l", "lora", dims, rng, r=8, sites=["q", "v"], n_labels=2),
              "a": random_delta("a", "adapter", dims, rng, variant="houlsby", bottleneck=16, n_labels=2),
              "b": random_delta("b", "bitfit", dims, rng, n_labels=2)}
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu", pool_config=PoolConfig(default_slots=4))
    try:
        got = eng.pool.acquire(list(deltas))
        for tid, d in deltas.items():
            r = got[tid]
            actual = r.bank.slot_bytes() + r.head_bank.slot_bytes()
            assert actual == bytes_per_tenant(d.pet_type, d.config, dims, elem_bytes=4), tid
        eng.pool.release(list(got.values()))
    finally:
        eng.close()
    two = {"task": "seq_cls", "labels": ["x", "y"]}
    # BERT-base, bf16: LoRA r8 on q,v = 12 layers * 2 sites * (8*768 + 768*8) * 2 bytes + head.
    assert bytes_per_tenant("lora", {**two, "r": 8, "sites": ["q", "v"]}, BERT_BASE) == \
        12 * 2 * (8 * 768 * 2) * 2 + (2 * 768 + 2) * 2
