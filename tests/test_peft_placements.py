"""Every placement PEFT's IA3 and LoRA produce on BERT-family checkpoints, end to end: each adapter
is built by `peft` itself (defaults, "all-linear", explicit lists, regex strings,
layers_to_transform, feedforward_modules, rank/alpha patterns), saved with save_pretrained,
imported with the `flockserve adapter import` console script, loaded back through the adapter
store and served by the engine in one mixed batch (with native tenants of other PET types);
served outputs must equal PEFT's own forward pass (fp32, relative error <= 1e-4). The same
batches also run on the Triton fast path under TRITON_INTERPRET=1 (CPU). RoBERTa and DistilBERT
SEQ_CLS adapters carry two-layer heads (classifier.dense + tanh + out_proj; pre_classifier + ReLU +
classifier) and share their batch with one-layer (token and native sequence) heads."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.engine.batch import PackedBatch, TenantDelta

TOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent


def _flockserve() -> str:
    exe = Path(sys.executable).parent / "flockserve"
    return str(exe) if exe.exists() else shutil.which("flockserve")


@pytest.fixture()
def cli(database_url, tmp_path):
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url, "FLOCK_STORE_DIR": str(tmp_path / "blobs"),
           "COLUMNS": "200"}

    def run(*args, ok=True):
        p = subprocess.run([_flockserve(), *args], capture_output=True, text=True, env=env, timeout=180,
                           stdin=subprocess.DEVNULL)
        if ok:
            assert p.returncode == 0, p.stderr
        return p
    return run


# ---- tiny random bases (saved like any checkpoint) -----------------------------------------------
def _tiny(kind: str, path: Path) -> Path:
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig,
                              RobertaModel)
    torch.manual_seed({"bert": 0, "roberta": 1, "distilbert": 2}[kind])
    if kind == "bert":
        m = BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    elif kind == "roberta":
        m = RobertaModel(RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
                                       type_vocab_size=1))
    else:
        m = DistilBertModel(DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    m.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_bases")
    return {k: _tiny(k, root / k) for k in ("bert", "roberta", "distilbert")}


# ---- PEFT adapters ----------------------------------------------------------------------------------
def _peft_configs():
    from peft import IA3Config, LoraConfig
    S, T = "SEQ_CLS", "TOKEN_CLS"
    lora = dict(lora_dropout=0.0)
    return {
        # real MiniLM (BERT): sequence classification through the pooler
        "minilm": [
            ("ia3-defaults", S, IA3Config(task_type=S)),
            ("ia3-all-linear", S, IA3Config(task_type=S, target_modules="all-linear")),
            ("ia3-ff-inputs", S, IA3Config(task_type=S, target_modules=["query", "value", "intermediate.dense",
                                                                          "attention.output.dense", "output.dense"],
                                           feedforward_modules=["query", "intermediate.dense"])),
            ("lora-all-linear", S, LoraConfig(task_type=S, target_modules="all-linear", r=8, lora_alpha=16, **lora)),
            ("lora-list", S, LoraConfig(task_type=S, target_modules=["key", "attention.output.dense",
                                                                       "intermediate.dense"], r=4, **lora)),
            ("lora-regex", S, LoraConfig(task_type=S, r=4, lora_alpha=4, **lora, target_modules=(
                r".*layer\.[0-2]\.attention\.self\.(query|value)|.*layer\.5\.output\.dense|.*pooler\.dense"))),
            ("lora-layers", S, LoraConfig(task_type=S, target_modules=["query", "value", "dense"], r=8,
                                          layers_to_transform=[1, 4], rank_pattern={"value": 4},
                                          alpha_pattern={"query": 32}, use_rslora=True, **lora)),
            ("lora-tok", T, LoraConfig(task_type=T, target_modules=["query", "key", "value", "output.dense"],
                                       r=4, **lora)),
        ],
        "bert": [
            ("ia3-defaults-tok", T, IA3Config(task_type=T)),
            ("ia3-all-linear", S, IA3Config(task_type=S, target_modules="all-linear")),
            ("ia3-ff-inputs", S, IA3Config(task_type=S, target_modules=["key", "value", "intermediate.dense",
                                                                          "attention.output.dense", "output.dense",
                                                                          "pooler.dense"],
                                           feedforward_modules=["key", "intermediate.dense", "pooler.dense"])),
            ("lora-all-linear", S, LoraConfig(task_type=S, target_modules="all-linear", r=4, **lora)),
        ],
        # RoBERTa / DistilBERT SEQ_CLS: two-layer heads (classifier.dense + tanh + classifier.out_proj;
        # pre_classifier + ReLU + classifier) on the first token, served as Flock two-layer heads
        "roberta": [
            ("ia3-defaults-seq", S, IA3Config(task_type=S)),
            ("lora-all-linear-seq", S, LoraConfig(task_type=S, target_modules="all-linear", r=4, **lora)),
            ("ia3-defaults", T, IA3Config(task_type=T)),
            ("lora-dense", T, LoraConfig(task_type=T, target_modules=["query", "key", "value", "dense"], r=4, **lora)),
            ("lora-regex", T, LoraConfig(task_type=T, r=2, target_modules=r".*\.(0|2)\.(attention\.self\.key|intermediate\.dense)", **lora)),
        ],
        "distilbert": [
            ("ia3-seq", S, IA3Config(task_type=S, target_modules=["k_lin", "v_lin", "lin2"],
                                     feedforward_modules=["lin2"])),
            ("lora-seq", S, LoraConfig(task_type=S, target_modules=["q_lin", "v_lin", "out_lin", "lin1"], r=4,
                                       **lora)),
            ("ia3-list", T, IA3Config(task_type=T, target_modules=["k_lin", "v_lin", "out_lin", "lin1", "lin2"],
                                      feedforward_modules=["out_lin", "lin2"])),
            ("lora-list", T, LoraConfig(task_type=T, target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1",
                                                                      "lin2"], r=4, **lora)),
            ("lora-layers", T, LoraConfig(task_type=T, target_modules=["q_lin", "lin2"], layers_to_transform=[2],
                                          r=4, **lora)),
        ],
    }


def _make(base_dir, task, cfg, out: Path, seed: int, n_labels: int):
    """PEFT model with every trainable tensor randomised (PEFT inits LoRA B = 0, IA3 l = 1)."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    model = cls.from_pretrained(str(base_dir), num_labels=n_labels, attn_implementation="eager")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "lora_B" in name:
                p.normal_(0, 0.05)
            elif "classifier" in name and p.requires_grad:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(out))
    return pm.eval()


def _batch(tenants, rng, vocab, roberta, distil, per=2):
    seq_t = [t for t in tenants for _ in range(per)]
    seq_t = [seq_t[i] for i in rng.permutation(len(seq_t))]
    chunks = [torch.from_numpy(rng.integers(3 if roberta else 1, vocab, size=int(rng.integers(3, 24))))
              for _ in seq_t]
    lens = torch.tensor([len(c) for c in chunks])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    tt = None if distil else torch.zeros(int(cu[-1]), dtype=torch.long)
    return PackedBatch(torch.cat(chunks), cu, seq_t, tt, list(range(len(seq_t))))


def _peft_out(pm, ids, tt):
    kw = {} if tt is None else {"token_type_ids": tt[None]}
    with torch.no_grad():
        return pm(input_ids=ids[None], **kw).logits[0]


def _err(got, want) -> tuple[float, float]:
    got, want = torch.as_tensor(got, dtype=torch.float64), want.double()
    a = float((got - want).abs().max())
    return a, a / float(want.abs().max().clamp_min(1e-6))


def _compare(outs, batch, models, tasks, report, tag):
    cu = batch.cu_seqlens.tolist()
    for i, o in enumerate(outs):
        t = batch.tenant_ids[i]
        if t not in models:
            continue
        assert o.error is None, (t, o.error)
        ids = batch.input_ids[cu[i]:cu[i + 1]]
        tt = None if batch.token_type_ids is None else batch.token_type_ids[cu[i]:cu[i + 1]]
        want = _peft_out(models[t], ids, tt)
        if tasks[t] == "SEQ_CLS":
            a, r = _err(o.logits, want)
        else:  # token heads report probabilities: compare log-probabilities
            a, r = _err(torch.log(torch.tensor(o.token_scores, dtype=torch.float64)), torch.log_softmax(want.double(), -1))
        name = t.split("--")[0]
        report[(tag, name)] = max(report.get((tag, name), (0, 0)), (a, r))
        assert r <= TOL, (tag, t, a, r)


INTERPRET_CHILD = r'''
import os, pickle, sys, torch
torch.set_num_threads(1)
from workers.engine.runtime import Engine
base, deltas, batch = pickle.load(open(sys.argv[1], "rb"))
eng = Engine(base, lambda t: deltas[t], device="cpu", dtype=torch.float32)
fast = eng.encoder.fast
outs = eng.run(batch, timeout=600)
eng.close()
pickle.dump((fast, outs), open(sys.argv[2], "wb"))
'''


def _serve_interpret(tmp_path, base_dir, deltas, batch):
    inp, out = tmp_path / "interp_in.pkl", tmp_path / "interp_out.pkl"
    with open(inp, "wb") as f:
        pickle.dump((str(base_dir), deltas, batch), f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", INTERPRET_CHILD, str(inp), str(out)], check=True, cwd=ROOT, env=env,
                   timeout=900)
    with open(out, "rb") as f:
        fast, outs = pickle.load(f)
    assert fast, "TRITON_INTERPRET=1 did not select the fast path"
    return outs


# The tiny BERT case runs in `make test-fast`; the real MiniLM and the other architectures only
# in `make test` (minutes of CPU between them).
@pytest.mark.parametrize("base", [pytest.param("minilm", marks=pytest.mark.slow), "bert",
                                  pytest.param("roberta", marks=pytest.mark.slow),
                                  pytest.param("distilbert", marks=pytest.mark.slow)])
def test_peft_placements_served_equal_peft(base, cli, sessions, unique, tmp_path, minilm_dir, tiny_bases):
    from tests.engine.conftest import random_delta
    from schema.layout import BaseDims
    from workers.adapters.store import AdapterStore, make_backend
    from workers.engine.runtime import Engine
    from workers.serving.adapter_source import StoreLoader

    base_dir = Path(minilm_dir) if base == "minilm" else tiny_bases[base]
    base_id = str(base_dir)
    hf_cfg = json.loads((base_dir / "config.json").read_text())
    dims = BaseDims.from_hf_config(hf_cfg)
    models, tasks, deltas = {}, {}, {}
    store = AdapterStore(sessions, make_backend("postgres", tmp_path / "blobs"))
    loader = StoreLoader(store, base_id)
    for j, (name, task, cfg) in enumerate(_peft_configs()[base]):
        tenant = f"{name}--{unique}"
        d = tmp_path / name
        models[tenant] = _make(base_dir, task, cfg, d, seed=j, n_labels=2 + j % 4)
        tasks[tenant] = task
        cli("tenant", "create", tenant)
        rec = json.loads(cli("adapter", "import", tenant, str(d), "--base-model", base_id, "--json").stdout)
        assert rec["pet_type"] == ("ia3" if name.startswith("ia3") else "lora")
        deltas[tenant] = loader(tenant)
    # the PEFT default IA3 on BERT really is the placement of the issue: attn_out input scaling included
    if base == "minilm":
        cfg = deltas[f"ia3-defaults--{unique}"].config
        assert cfg["sites"] == ["attn_out.in", "ffn_out.in", "k.out", "v.out"], cfg
        assert "pooler" in deltas[f"lora-all-linear--{unique}"].config["sites"]
    if base in ("roberta", "distilbert"):  # SEQ_CLS heads import as two-layer heads on the first token
        for name, task, _ in _peft_configs()[base]:
            cfg = deltas[f"{name}--{unique}"].config
            want = {"layers": 2, "activation": "tanh" if base == "roberta" else "relu"} if task == "SEQ_CLS" else None
            assert cfg.get("head") == want and cfg.get("pooling") == ("cls" if want else None), (name, cfg)
        # the same two-layer head as a Flock-native adapter (flock_adapter.json + adapter.safetensors)
        from safetensors.torch import save_file
        src = f"{_peft_configs()[base][0][0]}--{unique}"
        nat, d = f"native-{src}", tmp_path / "native-two-layer"
        d.mkdir()
        (d / "flock_adapter.json").write_text(json.dumps({"pet_type": deltas[src].pet_type,
                                                          "config": deltas[src].config}))
        save_file({k: v.contiguous() for k, v in deltas[src].tensors.items()}, str(d / "adapter.safetensors"))
        cli("tenant", "create", nat)
        cli("adapter", "import", nat, str(d), "--base-model", base_id)
        deltas[nat], models[nat], tasks[nat] = loader(nat), models[src], tasks[src]
        assert deltas[nat].config["head"]["layers"] == 2
    # native tenants of other PET types share the batch (not compared with PEFT; checked for isolation)
    rng = np.random.default_rng(7)
    if base in ("minilm", "bert"):
        for k, pet in enumerate(("bitfit", "adapter", "lora", "ia3")):
            deltas[f"native-{pet}"] = random_delta(f"native-{pet}", pet, dims, rng, task="seq_cls", pooling="pooler")
    else:  # one-layer sequence heads in the same batch as the two-layer ones
        for pet in ("lora", "bitfit"):
            deltas[f"native-{pet}"] = random_delta(f"native-{pet}", pet, dims, rng, task="seq_cls", pooling="cls")
    batch = _batch(list(deltas), rng, vocab=int(hf_cfg["vocab_size"]) if base != "minilm" else 30000,
                   roberta=base == "roberta", distil=base == "distilbert")
    eng = Engine(base_id, lambda t: deltas[t], device="cpu")
    try:
        outs = eng.run(batch, timeout=300)
    finally:
        eng.close()
    report: dict = {}
    _compare(outs, batch, models, tasks, report, "torch")
    if base != "minilm":  # the Triton fast path (interpreted on CPU: tiny models only, it is slow)
        fouts = _serve_interpret(tmp_path, base_dir, deltas, batch)
        _compare(fouts, batch, models, tasks, report, "triton-interpret")
        for o, f in zip(outs, fouts):  # native tenants too: both paths agree
            if o.logits is not None:
                assert _err(f.logits, torch.tensor(o.logits))[1] <= TOL
    for (tag, name), (a, r) in sorted(report.items()):
        print(f"{base:10s} {tag:16s} {name:18s} max abs {a:.2e} rel {r:.2e}")


def test_unservable_placements_say_what_to_change(cli, unique, tmp_path, tiny_bases):
    from peft import LoraConfig
    t = f"refuse-{unique}"
    cli("tenant", "create", t)
    cases = [
        ("distilbert", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"]),
         "holds no pre_classifier"),  # (pre_classifier stripped from the saved file below)
        ("roberta", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]),
         "save both"),  # (classifier.dense stripped)
        ("bert", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", target_modules=["query", "word_embeddings"]),
         "remove the embedding modules"),
        ("bert", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", target_modules=["query"], use_dora=True),
         "use_dora=False"),
        ("bert", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", target_modules=["query"], bias="lora_only"),
         "bias='none'"),
    ]
    for j, (base, task, cfg, msg) in enumerate(cases):
        d = tmp_path / f"bad{j}"
        _make(tiny_bases[base], task, cfg, d, seed=j, n_labels=2)
        if j < 2:  # a partial two-layer head, as a hand-edited or foreign save would hold
            from safetensors.torch import load_file, save_file
            f = d / "adapter_model.safetensors"
            save_file({k: v for k, v in load_file(str(f)).items()
                       if not re.search(r"pre_classifier|classifier\.dense", k)}, str(f))
        p = cli("adapter", "import", t, str(d), "--base-model", str(tiny_bases[base]), ok=False)
        assert p.returncode == 1 and msg in p.stderr, (j, p.stderr)
