"""Lower-layer skipping (issue 13): the table-assembled layer-K states against a direct
reference of the shallow part (plain transformers layers, one window at a time), unseen tri-grams
computed then served from the table, and mixed batches of skipping and non-skipping tenants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.engine.conftest import dims_of
from workers.engine.batch import PackedBatch
from workers.engine.model_loading import load_base
from workers.engine.plot import build
from workers.engine.plot import trigrams as tg
from workers.engine.plot.serve import PlotRuntime, plot_skip
from workers.engine.plot.shallow import ShallowWeights
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine
from workers.engine.synthetic import random_delta

K = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(plain 3-layer base, its skipping base with K = 2 and a perturbed, non-trivial shallow part)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    m = BertModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    base_dir = tmp_path_factory.mktemp("plot_base")
    m.save_pretrained(base_dir, safe_serialization=True)
    sw = ShallowWeights.init_from(load_base(str(base_dir)), K)
    g = torch.Generator().manual_seed(2)
    for t in sw.params():  # the shallow part's own weights differ from the base's lower layers
        t.add_(torch.randn(t.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("plot_skip")
    build.write_base(str(base_dir), out, sw, {"base": str(base_dir), "skip": K}, None)
    return str(base_dir), str(out), sw


def _reference(base_dir: str, sw: ShallowWeights, ids: list[int], tt: list[int]) -> torch.Tensor:
    """Layer-K states of one sequence, straight from SkipBERT's definition with HF modules."""
    from transformers import BertModel
    m = BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()
    h = m.config.hidden_size
    with torch.no_grad():
        for i, lw in enumerate(sw.layers):
            L = m.encoder.layer[i]
            for j, mod in enumerate((L.attention.self.query, L.attention.self.key, L.attention.self.value)):
                mod.weight.copy_(lw.qkv_w[j * h:(j + 1) * h])
                mod.bias.copy_(lw.qkv_b[j * h:(j + 1) * h])
            for mod, w, b in ((L.attention.output.dense, lw.attn_out_w, lw.attn_out_b),
                              (L.attention.output.LayerNorm, lw.attn_ln_w, lw.attn_ln_b),
                              (L.intermediate.dense, lw.ffn_in_w, lw.ffn_in_b),
                              (L.output.dense, lw.ffn_out_w, lw.ffn_out_b),
                              (L.output.LayerNorm, lw.ffn_ln_w, lw.ffn_ln_b)):
                mod.weight.copy_(w)
                mod.bias.copy_(b)
        n = len(ids)
        tri = []
        for t in range(n):  # window t as its own 3-token sequence; edges masked out
            win = [ids[t - 1] if t > 0 else 0, ids[t], ids[t + 1] if t + 1 < n else 0]
            mask = torch.tensor([[t > 0, True, t + 1 < n]]).long()
            hs = m(input_ids=torch.tensor([win]), attention_mask=mask, output_hidden_states=True).hidden_states[K][0]
            gated = hs * torch.sigmoid(hs @ sw.gate_w + sw.gate_b)[:, None]
            tri.append(gated * mask[0, :, None])
        rows = []
        for t in range(n):
            s = tri[t][1] + (tri[t + 1][0] if t + 1 < n else 0) + (tri[t - 1][2] if t > 0 else 0)
            s = s + sw.pos2[t] + sw.type2[tt[t]]
            rows.append(F.layer_norm(s, (h,), sw.ln_w, sw.ln_b, m.config.layer_norm_eps))
        return torch.stack(rows)


def _packed(seqs, tts):
    lens = [len(s) for s in seqs]
    cu = torch.tensor([0] + np.cumsum(lens).tolist())
    return torch.tensor(sum(seqs, [])), cu, torch.tensor(sum(tts, []))


def _states(rt: PlotRuntime, seqs, tts, use_table=True):
    ids, cu, tt = _packed(seqs, tts)
    tok_seq = torch.repeat_interleave(torch.arange(len(seqs)), cu[1:] - cu[:-1])
    local = torch.arange(ids.numel()) - cu[tok_seq]
    hp, hn = tg.neighbours(cu, tok_seq, local)
    return rt.lower_states(ids, tt, local, hp, hn, use_table=use_table)


def test_keys_round_trip():
    rng = np.random.default_rng(0)
    win = torch.from_numpy(rng.integers(-1, 30522, size=(1000, 3)))
    assert torch.equal(tg.unkey(tg.keys(win, 30522), 30522), win)


def test_assembled_states_equal_reference(dirs):
    base_dir, skip_dir, sw = dirs
    assert plot_skip(skip_dir) == K and plot_skip(base_dir) is None
    rt = PlotRuntime(skip_dir, load_base(skip_dir), torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 120, size=n).tolist() for n in (1, 2, 7, 13)]
    tts = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]
    want = torch.cat([_reference(base_dir, sw, s, t) for s, t in zip(seqs, tts)])
    for use_table in (False, True):
        got = _states(rt, seqs, tts, use_table)
        assert (got - want).abs().max() < 1e-5


def test_unseen_trigram_computed_then_served(dirs):
    _, skip_dir, _ = dirs
    base = load_base(skip_dir)
    rt = PlotRuntime(skip_dir, base, torch.device("cpu"), torch.float32)
    seqs, tts = [[5, 6, 7, 8], [9, 5, 6]], [[0] * 4, [0] * 3]
    direct = _states(rt, seqs, tts, use_table=False)
    first = _states(rt, seqs, tts)
    r1 = rt.report()
    assert r1["misses"] == r1["lookups"] == 7 and r1["device_rows"] == 7
    second = _states(rt, seqs, tts)
    r2 = rt.report()
    assert r2["misses"] == 7 and r2["hits_device"] == 7  # all served from the table
    assert torch.equal(first, direct) and torch.equal(second, direct)

    # A device tier of 4 rows and a host tier of 100: evicted rows go to pinned host memory and
    # come back (promoted) with the same values; never a wrong state, only more copying.
    row = 3 * 64 * 4
    small = PlotRuntime(skip_dir, base, torch.device("cpu"), torch.float32, device_bytes=4 * row, host_bytes=100 * row)
    a = _states(small, [[5, 6, 7, 8]], [[0] * 4])
    b = _states(small, [[9, 5, 6]], [[0] * 3])
    c = _states(small, [[5, 6, 7, 8]], [[0] * 4])
    rep = small.report()
    assert rep["device_rows"] <= 4 and rep["host_rows"] > 0 and rep["hits_host"] > 0
    assert torch.equal(a, c) and torch.equal(torch.cat([a, b]), direct)

    # Storage grows with the rows (1,024 first, then doubling) without moving any value.
    rng = np.random.default_rng(7)
    many = [rng.integers(1, 120, size=60).tolist() for _ in range(40)]
    want = _states(rt, many, [[0] * 60] * 40, use_table=False)
    assert torch.equal(_states(rt, many, [[0] * 60] * 40), want)
    assert rt.report()["device_rows"] > 1024 and torch.equal(_states(rt, many, [[0] * 60] * 40), want)


def test_insert_cap_keeps_states_exact_and_admits_the_rest_later(dirs):
    """A batch of more new windows than FLOCK_PLOT_INSERT_ROWS: every state is still the directly
    computed one; only the cap's worth is kept, and later batches admit the rest."""
    _, skip_dir, _ = dirs
    base = load_base(skip_dir)
    rt = PlotRuntime(skip_dir, base, torch.device("cpu"), torch.float32, insert_rows=3)
    seqs, tts = [[5, 6, 7, 8], [9, 5, 6]], [[0] * 4, [0] * 3]  # 7 distinct windows
    direct = _states(rt, seqs, tts, use_table=False)
    for n in (1, 2, 3):  # (a smaller batch of misses may round differently in the last bit)
        assert torch.allclose(_states(rt, seqs, tts), direct, rtol=1e-5, atol=1e-6)
        rep = rt.report()
        assert rep["device_rows"] == min(7, 3 * n)  # 3 more admitted per batch
        assert rep["misses"] == sum(7 - min(7, 3 * j) for j in range(n))
    assert rep["not_admitted"] == 4 + 1
    assert torch.allclose(_states(rt, seqs, tts), direct, rtol=1e-5, atol=1e-6)
    assert rt.report()["hits_device"] >= 7


def _upper_only(delta, k: int):
    delta.tensors = {n: t for n, t in delta.tensors.items()
                     if not n.startswith("layers.") or int(n.split(".")[1]) >= k}
    delta.config["layers"] = list(range(k, 3))
    return delta


def test_mixed_batch_equals_each_alone(dirs):
    base_dir, skip_dir, _ = dirs
    dims = dims_of(base_dir)
    deltas = {"lo_skip": _upper_only(random_delta("lo_skip", "lora", dims, 1, n_labels=3), K),
              "ad_skip": _upper_only(random_delta("ad_skip", "adapter", dims, 2, n_labels=4, bottleneck=8), K),
              "lo_full": random_delta("lo_full", "lora", dims, 3, n_labels=3),
              "bf_full": random_delta("bf_full", "bitfit", dims, 4, n_labels=2)}
    eng = Engine(skip_dir, lambda t: deltas[t], device="cpu", pool_config=PoolConfig(default_slots=8))
    plain = Engine(base_dir, lambda t: deltas[t], device="cpu", pool_config=PoolConfig(default_slots=8))
    try:
        rng = np.random.default_rng(5)
        tenants = ["lo_skip", "lo_full", "ad_skip", "bf_full", "lo_skip", "ad_skip", "lo_full"]
        seqs = [rng.integers(1, 120, size=int(rng.integers(2, 20))).tolist() for _ in tenants]
        ids, cu, _ = _packed(seqs, [[0] * len(s) for s in seqs])
        mixed = eng.run(PackedBatch(ids, cu, tenants))
        for t in deltas:
            assert eng.skips(t) == t.endswith("_skip")
        for i, (tid, s) in enumerate(zip(tenants, seqs)):
            alone = eng.run(PackedBatch(torch.tensor(s), torch.tensor([0, len(s)]), [tid]))
            assert mixed[i].error is None
            assert np.abs(np.asarray(mixed[i].logits) - np.asarray(alone[0].logits)).max() < 1e-5, tid
            if not eng.skips(tid):  # non-skipping rows: exactly the plain base's result
                ref = plain.run(PackedBatch(torch.tensor(s), torch.tensor([0, len(s)]), [tid]))
                assert np.abs(np.asarray(mixed[i].logits) - np.asarray(ref[0].logits)).max() < 1e-5, tid
        stats = eng.plot_stats()
        assert stats["skip"] == K and stats["lookups"] > 0 and stats["hits_device"] > 0
        assert plain.plot_stats() is None
        from workers.serving.metrics import PlotCollector  # /metrics exports them
        fams = {m.name: m for m in PlotCollector(eng.plot_stats).collect()}
        assert {s.labels["tier"]: s.value for s in fams["flock_plot_table_rows"].samples}["device"] == stats["device_rows"]
        assert 0 < fams["flock_plot_hit_rate"].samples[0].value < 1
        assert list(PlotCollector(plain.plot_stats).collect()) == []
    finally:
        eng.close()
        plain.close()


def test_build_plot_cli_resumes_and_serves(tmp_path, monkeypatch):
    """`flockserve base build-plot` on MiniLM (K=2, a few steps on a tiny corpus): a derived base
    whose table loads; a rerun with a higher step cap continues from the checkpoint."""
    import json

    from typer.testing import CliRunner

    from workers.cli import app
    from workers.config import settings
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the market rose {i} points as shares of tech firms gained\n" for i in range(12)))
    monkeypatch.setenv("FLOCK_MODELS_DIR", str(tmp_path / "models"))
    settings.cache_clear()
    try:
        args = ["base", "build-plot", "all-MiniLM-L6-v2", "--skip", "2", "--corpus", str(corpus), "--out-id", "mini-p2",
                "--batch-size", "4", "--max-length", "16", "--ckpt-every", "1", "--json"]
        r = CliRunner().invoke(app, args + ["--max-steps", "2"])
        assert r.exit_code == 0, r.output
        first = json.loads(r.output)
        assert first["steps"] == 2 and first["table_rows"] > 0
        r = CliRunner().invoke(app, args + ["--max-steps", "3"])
        assert r.exit_code == 0, r.output
        again = json.loads(r.output)
        assert again["steps"] == 3 and again["loss_first"] == first["loss_first"]  # resumed, not restarted
        out = tmp_path / "models" / "mini-p2"
        assert plot_skip(str(out)) == 2
        rt = PlotRuntime(str(out), load_base(str(out)), torch.device("cpu"), torch.float32)
        assert rt.loaded == again["table_rows"]
        from workers.models import skipping_note  # what import and training report
        md = tmp_path / "models"
        assert skipping_note("mini-p2", ["layers.2.q.lora_A", "head.weight"], md).startswith("lower-layer skipping: yes")
        assert "no (touches layer 0" in skipping_note("mini-p2", ["layers.0.q.lora_A", "layers.3.q.lora_A"], md)
        assert skipping_note("all-MiniLM-L6-v2", ["layers.0.q.lora_A"], md) is None
        bad = CliRunner().invoke(app, ["base", "build-plot", "all-MiniLM-L6-v2", "--skip", "6", "--corpus", str(corpus)])
        assert bad.exit_code == 1 and "error: --skip must be in 1..5" in bad.output
    finally:
        settings.cache_clear()
