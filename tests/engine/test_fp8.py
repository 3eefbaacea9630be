"""FP8 base (issue 14 item 3), CPU: calibration, the e4m3 numerics and batch independence.

The reference is a plain ``transformers`` BertModel whose shared Linear layers see e4m3-rounded
inputs (static scale per GEMM) and e4m3-rounded weights (one scale per GEMM: q, k and v share the
fused QKV's), built here from the checkpoint and torch's own float8 casts, not from Flock's code.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workers.engine.batch import PackedBatch
from workers.engine.fp8 import FP8_FILE, FP8_KEY, build_fp8_base
from workers.engine.runtime import Engine

from .conftest import random_delta, rel_err

E4M3 = torch.float8_e4m3fn


def _rt(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t rounded through e4m3 at ``scale`` (saturating), back in fp32."""
    return (t / scale).clamp(-448, 448).to(E4M3).float() * scale


def _gemms(layer):
    """The four shared GEMMs of an HF BERT layer: name -> Linear modules fed the same input."""
    a = layer.attention
    return {"qkv": [a.self.query, a.self.key, a.self.value], "attn_out": [a.output.dense],
            "ffn_in": [layer.intermediate.dense], "ffn_out": [layer.output.dense]}


def _observed_amax(hf, texts_ids) -> torch.Tensor:
    amax = torch.zeros(len(hf.encoder.layer), 4)
    hooks = []
    for i, layer in enumerate(hf.encoder.layer):
        for j, mods in enumerate(_gemms(layer).values()):
            def pre(mod, args, i=i, j=j):
                amax[i, j] = max(float(amax[i, j]), float(args[0].abs().max()))
            hooks.append(mods[0].register_forward_pre_hook(pre))
    with torch.no_grad():
        for ids in texts_ids:
            hf(input_ids=ids[None])
    for h in hooks:
        h.remove()
    return amax


def _fake_quant(hf, amax: torch.Tensor) -> None:
    """Turn ``hf`` into the FP8 reference in place."""
    for i, layer in enumerate(hf.encoder.layer):
        for j, mods in enumerate(_gemms(layer).values()):
            sw = max(float(m.weight.detach().abs().max()) for m in mods) / 448
            sx = float(amax[i, j]) / 448
            for m in mods:
                with torch.no_grad():
                    m.weight.copy_(_rt(m.weight, sw))
                m.register_forward_pre_hook(lambda mod, args, sx=sx: (_rt(args[0], sx),))


WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "quiet", "market", "cloud", "seven"]


@pytest.fixture(scope="module")
def fp8_base(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with a WordPiece vocabulary of its own (ids < its 120), its FP8 base."""
    src = tmp_path_factory.mktemp("tiny_vocab")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_bert_dir, f), src / f)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    rng = np.random.default_rng(5)
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    words = WORDS
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=int(rng.integers(3, 20)))) for _ in range(40)))
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    summary = build_fp8_base("tiny", str(src), out, [str(corpus)], batch_size=16)
    return str(src), out, corpus, summary


def test_build_writes_a_derived_base_with_calibrated_amax(fp8_base):
    from transformers import AutoModel, AutoTokenizer
    src, out, corpus, summary = fp8_base
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[FP8_KEY]["texts"] == 40 and summary["texts"] == 40
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()
    got = load_file(str(out / FP8_FILE))["act_amax"]
    tok = AutoTokenizer.from_pretrained(src)
    ids = [torch.tensor(tok(t)["input_ids"]) for t in corpus.read_text().splitlines()]
    want = _observed_amax(AutoModel.from_pretrained(src).eval(), ids)
    assert got.shape == want.shape == (2, 4)
    assert rel_err(got, want) < 1e-5


def _batch(rng, tenants, vocab=120):
    lens = rng.integers(3, 30, size=len(tenants))
    ids = torch.from_numpy(rng.integers(1, vocab, size=int(lens.sum())))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(lens).cumsum(0)])
    return PackedBatch(ids, cu, tenants)


def test_fp8_base_matches_an_independent_fake_quant_reference(fp8_base):
    from transformers import AutoModel
    src, out, _, _ = fp8_base
    amax = load_file(str(out / FP8_FILE))["act_amax"]
    ref = AutoModel.from_pretrained(src).eval()
    plain = AutoModel.from_pretrained(src).eval()
    _fake_quant(ref, amax)
    batch = _batch(np.random.default_rng(1), ["-"] * 9)
    eng = Engine(str(out), lambda t: None, device="cpu")
    try:
        assert eng.tuned_choices()["fp8_base"] == "emulated"
        got = eng.encode_base(batch)
    finally:
        eng.close()
    cu = batch.cu_seqlens
    worst, drift = 0.0, 0.0
    for i in range(batch.num_seqs):
        s = batch.input_ids[cu[i]:cu[i + 1]][None]
        with torch.no_grad():
            want = ref(input_ids=s).last_hidden_state[0]
            full = plain(input_ids=s).last_hidden_state[0]
        worst = max(worst, rel_err(got[cu[i]:cu[i + 1]], want))
        drift = max(drift, rel_err(got[cu[i]:cu[i + 1]], full))
    assert worst < 1e-4, worst  # same roundings, fp32 arithmetic on both sides
    assert 1e-4 < drift < 0.1, drift  # FP8 does change the numbers, within e4m3's resolution


def test_fp8_mixed_batch_equals_each_tenant_alone(fp8_base):
    from .conftest import dims_of
    src, out, _, _ = fp8_base
    dims = dims_of(src)
    rng = np.random.default_rng(7)
    deltas = {f"{p}{k}": random_delta(f"{p}{k}", p, dims, rng)
              for p in ("lora", "bitfit", "adapter", "ia3") for k in range(2)}
    tenants = [list(deltas)[int(j)] for j in rng.integers(0, len(deltas), size=14)]
    batch = _batch(rng, tenants)
    eng = Engine(str(out), deltas.__getitem__, device="cpu")
    try:
        mixed = eng.run(batch)
        cu = batch.cu_seqlens
        for i, t in enumerate(tenants):
            alone = eng.run(PackedBatch(batch.input_ids[cu[i]:cu[i + 1]], torch.tensor([0, int(cu[i + 1] - cu[i])]), [t]))
            assert mixed[i].error is None
            assert rel_err(torch.tensor(mixed[i].scores), torch.tensor(alone[0].scores)) < 1e-5
    finally:
        eng.close()


def test_build_fp8_cli_on_minilm(tmp_path, monkeypatch):
    """`flockserve base build-fp8` on the real MiniLM: a derived base the engine serves in
    (emulated) e4m3, whose sentence embeddings stay close to the plain base's; bad input is one
    error line."""
    from typer.testing import CliRunner

    from workers.cli import app
    from workers.config import settings
    from workers.engine.batch import RequestItem
    from workers.engine.tokenize import BatchTokenizer
    from workers.models import resolve_model_dir
    texts = [f"shares of tech firm {i} rose as the market gained ground" for i in range(10)] + \
            ["the team won the cup final after extra time", "new film tops the box office"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setenv("FLOCK_MODELS_DIR", str(tmp_path / "models"))
    settings.cache_clear()
    try:
        r = CliRunner().invoke(app, ["base", "build-fp8", "all-MiniLM-L6-v2", "--corpus", str(corpus),
                                     "--batch-size", "4", "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.output)
        assert res["id"] == "all-MiniLM-L6-v2-fp8" and res["texts"] == 12 and res["amax_max"] > res["amax_min"] > 0
        plain_dir = str(resolve_model_dir("all-MiniLM-L6-v2"))
        batch = BatchTokenizer(plain_dir, 64).pack([RequestItem("-", text=t) for t in texts[8:]])
        outs = {}
        for name, d in (("plain", plain_dir), ("fp8", res["out"])):
            eng = Engine(d, lambda t: None, device="cpu")
            try:
                outs[name] = eng.encode_base(batch)
            finally:
                eng.close()
        cos = torch.nn.functional.cosine_similarity(outs["fp8"], outs["plain"], dim=-1)
        assert cos.min() > 0.98 and rel_err(outs["fp8"], outs["plain"]) > 1e-4, (cos.min(), rel_err(outs["fp8"], outs["plain"]))
        bad = CliRunner().invoke(app, ["base", "build-fp8", "all-MiniLM-L6-v2", "--corpus", str(tmp_path / "nope.txt")])
        assert bad.exit_code == 1 and bad.output.strip().startswith("error:") and "nope.txt" in bad.output
    finally:
        settings.cache_clear()
