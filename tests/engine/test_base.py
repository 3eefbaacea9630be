"""Plain base forward over packed tokens equals transformers' own model (fp32)."""

import numpy as np
import pytest
import torch

from workers.engine.batch import PackedBatch
from workers.engine.errors import ModelLoadError
from workers.engine.runtime import Engine

from .conftest import rel_err


def _no_loader(tid):
    raise KeyError(tid)


def _compare(model_dir, hf_model, rng, n=7, max_len=30, token_types=True, offset=0):
    lens = rng.integers(2, max_len, size=n)
    vocab = hf_model.config.vocab_size
    seqs = [torch.from_numpy(rng.integers(offset + 1, vocab, size=int(L))) for L in lens]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lens).cumsum(0)])
    tts = [torch.from_numpy((np.arange(int(L)) >= L // 2).astype(np.int64)) for L in lens] if token_types else None
    batch = PackedBatch(torch.cat(seqs), cu, ["-"] * n, torch.cat(tts) if tts else None)
    eng = Engine(model_dir, _no_loader, device="cpu")
    try:
        got = eng.encode_base(batch)
    finally:
        eng.close()
    worst = 0.0
    for i, s in enumerate(seqs):
        kw = {"token_type_ids": tts[i][None]} if tts else {}
        with torch.no_grad():
            want = hf_model(input_ids=s[None], **kw).last_hidden_state[0]
        err = rel_err(got[cu[i]:cu[i + 1]], want)
        worst = max(worst, err)
    assert worst < 1e-5, worst


def test_minilm_base_matches_transformers(minilm_dir):
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(minilm_dir).eval()
    _compare(minilm_dir, hf, np.random.default_rng(1), n=9, max_len=60)


def test_tiny_roberta_base_matches(tmp_path):
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=70, type_vocab_size=1, pad_token_id=1)
    m = RobertaModel(cfg).eval()
    m.save_pretrained(tmp_path)
    _compare(str(tmp_path), m, np.random.default_rng(2), token_types=False, offset=1)


def test_tiny_distilbert_base_matches(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    m = DistilBertModel(cfg).eval()
    m.save_pretrained(tmp_path)
    _compare(str(tmp_path), m, np.random.default_rng(3), token_types=False)


def test_pickled_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError):
        Engine(str(tmp_path), _no_loader, device="cpu")
