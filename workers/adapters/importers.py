"""Read adapter directories into Flock's layout: PEFT (LoRA, IA3) and Flock's native format.

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (a pickled
``adapter_model.bin`` is refused, never loaded). The classification head comes from
``modules_to_save`` (``classifier``): one linear layer (BERT/MiniLM, token heads), or two for
sequence classification on RoBERTa (``classifier.dense`` + tanh + ``classifier.out_proj``) and
DistilBERT (``pre_classifier`` + ReLU + ``classifier``), which import as config ``head: {"layers":
2, "activation"}`` with ``head.dense.*`` tensors. Native layout: ``flock_adapter.json`` ({"pet_type",
"config"}) + ``adapter.safetensors`` with tensors already named as in ``schema/layout.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.adapters.validate import AdapterRejected, parse_safetensors

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
NATIVE_CONFIG, NATIVE_WEIGHTS = "flock_adapter.json", "adapter.safetensors"  # manifest may pin "sha256"

# HF module path inside a layer -> Flock site. BERT/RoBERTa/MiniLM and DistilBERT names.
_SITE_OF_MODULE = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "attn_out", "intermediate.dense": "ffn_in", "output.dense": "ffn_out",
    "attention.q_lin": "q", "attention.k_lin": "k", "attention.v_lin": "v",
    "attention.out_lin": "attn_out", "ffn.lin1": "ffn_in", "ffn.lin2": "ffn_out",
}
_LAYER_KEY = re.compile(r"(?:^|\.)layer\.(\d+)\.(" + "|".join(re.escape(m) for m in _SITE_OF_MODULE)
                        + r")\.(lora_A|lora_B|ia3_l)(?:\.weight)?$")
_POOLER_KEY = re.compile(r"(?:^|\.)pooler\.dense\.(lora_A|lora_B|ia3_l)(?:\.weight)?$")
_HEAD_KEY = re.compile(r"(?:^|\.)(classifier|score)\.(weight|bias)$")
# two-layer sequence heads: RoBERTa classifier.dense + tanh + classifier.out_proj, DistilBERT
# pre_classifier + ReLU + classifier
_HEAD2_KEY = re.compile(r"(?:^|\.)(classifier\.dense|classifier\.out_proj|pre_classifier)\.(weight|bias)$")
_PEFT_PREFIX = "base_model.model."
_TASKS = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}


@dataclass(frozen=True)
class ImportedAdapter:
    pet_type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base_model_hint: str | None  # what the source says its base model was


def read_adapter_dir(path: Path, *, labels: list[str] | None = None, pooling: str | None = None,
                     max_bytes: int = 256 * 1024 * 1024) -> ImportedAdapter:
    path = Path(path)
    if not path.is_dir():
        raise AdapterRejected(f"{path} is not a directory")
    if (path / NATIVE_CONFIG).is_file():
        return _read_native(path, max_bytes)
    if (path / PEFT_CONFIG).is_file():
        return _read_peft(path, labels, pooling, max_bytes)
    raise AdapterRejected(f"{path} holds neither {PEFT_CONFIG} (PEFT) nor {NATIVE_CONFIG} (Flock)")


def _json(p: Path) -> dict[str, Any]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{p.name}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AdapterRejected(f"{p.name}: must hold a JSON object")
    return obj


def _weights(path: Path, name: str, max_bytes: int, sha256: str | None = None) -> dict[str, torch.Tensor]:
    f = path / name
    if not f.is_file():
        if (path / PEFT_PICKLE).exists():
            raise AdapterRejected(f"{PEFT_PICKLE} is a pickle and is refused; save with safetensors "
                                  "(PEFT: save_pretrained(..., safe_serialization=True))")
        raise AdapterRejected(f"{name} missing in {path}")
    if f.stat().st_size > max_bytes:
        raise AdapterRejected(f"{name} of {f.stat().st_size} bytes exceeds the limit of {max_bytes}")
    data = f.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise AdapterRejected(f"{name}: sha256 does not match the one its manifest declares")
    return parse_safetensors(data, max_bytes)


def _read_native(path: Path, max_bytes: int) -> ImportedAdapter:
    meta = _json(path / NATIVE_CONFIG)
    pet_type, config, sha = meta.get("pet_type"), meta.get("config"), meta.get("sha256")
    if not isinstance(pet_type, str) or not isinstance(config, dict):
        raise AdapterRejected(f"{NATIVE_CONFIG} needs string 'pet_type' and object 'config'")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise AdapterRejected(f"{NATIVE_CONFIG}: 'sha256' must be 64 hex characters")
    return ImportedAdapter(pet_type, config, _weights(path, NATIVE_WEIGHTS, max_bytes, sha),
                           meta.get("base_model_id"))


def _labels_for(path: Path, n: int, labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != n:
            raise AdapterRejected(f"{len(labels)} labels given but the head has {n} outputs")
        return labels
    cfg = path / "config.json"  # a saved HF model config next to the adapter carries label names
    if cfg.is_file():
        id2label = _json(cfg).get("id2label") or {}
        try:
            names = [id2label[str(i)] for i in range(n)]
            return [str(x) for x in names]
        except KeyError:
            pass
    return [f"LABEL_{i}" for i in range(n)]


def _read_peft(path: Path, labels: list[str] | None, pooling: str | None, max_bytes: int) -> ImportedAdapter:
    pc = _json(path / PEFT_CONFIG)
    peft_type = pc.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise AdapterRejected(f"PEFT type {peft_type!r} not supported (LORA, IA3)")
    task = _TASKS.get(pc.get("task_type"))
    if task is None:
        raise AdapterRejected(f"PEFT task_type {pc.get('task_type')!r} not supported (SEQ_CLS, TOKEN_CLS)")
    if pc.get("fan_in_fan_out"):
        raise AdapterRejected("fan_in_fan_out adapters (Conv1D models) are not BERT-family")
    if peft_type == "LORA":
        if pc.get("use_dora"):
            raise AdapterRejected("DoRA (use_dora=True) is not supported; train with use_dora=False")
        if pc.get("bias", "none") != "none":
            raise AdapterRejected(f"LoRA with bias={pc.get('bias')!r} trains base biases, which Flock does "
                                  "not serve with LoRA; train with bias='none'")
    raw = _weights(path, PEFT_WEIGHTS, max_bytes)

    # (layer | None for the pooler, site) -> {"lora_A"|"lora_B"|"ia3_l": tensor}, plus the PEFT module name
    found: dict[tuple[int | None, str], dict[str, torch.Tensor]] = {}
    module_of: dict[tuple[int | None, str], str] = {}
    head: dict[str, torch.Tensor] = {}
    head2: dict[str, dict[str, torch.Tensor]] = {}  # "classifier.dense" | "classifier.out_proj" | "pre_classifier"
    for key, t in raw.items():
        m = _LAYER_KEY.search(key)
        p = None if m else _POOLER_KEY.search(key)
        if m or p:
            cell = (int(m.group(1)), _SITE_OF_MODULE[m.group(2)]) if m else (None, "pooler")
            kind = m.group(3) if m else p.group(1)
            found.setdefault(cell, {})[kind] = t
            module_of[cell] = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            module_of[cell] = module_of[cell][:module_of[cell].rindex("." + kind)]
            continue
        h = _HEAD2_KEY.search(key)
        if h:
            head2.setdefault(h.group(1), {})[h.group(2)] = t
            continue
        h = _HEAD_KEY.search(key)
        if h:
            head[h.group(2)] = t
            continue
        raise AdapterRejected(_unsupported_tensor(key, task))
    if not found:
        raise AdapterRejected("no adapter tensors found")
    dense, act = _two_layer_head(raw, head, head2, task)
    if set(head) != {"weight", "bias"} or head["weight"].dim() != 2:
        raise AdapterRejected("no classification head: train with modules_to_save=['classifier'] "
                              "(a linear classifier with weight and bias)")
    n_labels = head["weight"].shape[0]
    tensors: dict[str, torch.Tensor] = {"head.weight": head["weight"], "head.bias": head["bias"]}
    config: dict[str, Any] = {"task": task, "labels": _labels_for(path, n_labels, labels)}
    if task == "seq_cls":
        # BertForSequenceClassification classifies the pooler output; RoBERTa / DistilBERT's two-layer
        # heads read the first token's hidden state (<s> / [CLS]) and have no pooler.
        config["pooling"] = pooling or ("cls" if dense else "pooler")
    if dense:
        h = head["weight"].shape[1]
        if dense["weight"].shape != (h, h) or dense["bias"].shape != (h,):
            raise AdapterRejected(f"classification head's dense layer has shape {tuple(dense['weight'].shape)}; "
                                  f"expected ({h}, {h}) before a classifier of input {h}")
        config["head"] = {"layers": 2, "activation": act}
        tensors["head.dense.weight"], tensors["head.dense.bias"] = dense["weight"], dense["bias"]
    if peft_type == "LORA":
        pet_type = "lora"
        cells = _lora_cells(found, module_of, pc, tensors, config)
    else:
        pet_type = "ia3"
        cells = _ia3_cells(found, tensors)
    _place(config, cells)
    return ImportedAdapter(pet_type, config, tensors, pc.get("base_model_name_or_path"))


def _two_layer_head(raw, head: dict, head2: dict, task: str):
    """(dense {"weight", "bias"} | None, activation) of the saved head; RoBERTa's out_proj moves
    into ``head``. Refuses partial two-layer heads with what to save."""
    distil = any(re.search(r"(?:^|\.)distilbert\.", k) for k in raw)
    if not head2:
        if task == "seq_cls" and distil:
            raise AdapterRejected("DistilBertForSequenceClassification's head is pre_classifier + ReLU + "
                                  "classifier and the adapter holds no pre_classifier: keep PEFT's default "
                                  "modules_to_save (or modules_to_save=['pre_classifier', 'classifier'])")
        return None, None
    if task != "seq_cls":
        raise AdapterRejected(f"tensors {sorted(head2)} form a two-layer head, which Flock serves for "
                              "task_type='SEQ_CLS' only; train a token classifier with a linear classifier")
    for name, d in head2.items():
        if set(d) != {"weight", "bias"} or d["weight"].dim() != 2:
            raise AdapterRejected(f"{name}: needs weight (2-D) and bias")
    if "pre_classifier" in head2:
        if set(head2) != {"pre_classifier"}:
            raise AdapterRejected(f"head tensors {sorted(head2)} mix DistilBERT's and RoBERTa's heads")
        return head2["pre_classifier"], "relu"
    if set(head2) != {"classifier.dense", "classifier.out_proj"} or head:
        raise AdapterRejected("RobertaForSequenceClassification's head is classifier.dense + tanh + "
                              "classifier.out_proj: save both (keep modules_to_save=['classifier'])")
    head.update(head2["classifier.out_proj"])
    return head2["classifier.dense"], "tanh"


def _unsupported_tensor(key: str, task: str) -> str:
    if re.search(r"lora_embedding_[AB]|(?:^|\.)embeddings\.", key):
        return (f"tensor {key!r}: LoRA/IA3 on the embeddings is not served; remove the embedding "
                "modules (word_embeddings, position_embeddings, ...) from target_modules")
    if re.search(r"lora_magnitude_vector", key):
        return f"tensor {key!r}: DoRA is not supported; train with use_dora=False"
    if re.search(r"\.(lora_A|lora_B|ia3_l)(\.|$)", key):
        return (f"tensor {key!r}: a LoRA/IA3 module outside the encoder's linear layers; set "
                "target_modules to query, key, value, attention.output.dense, intermediate.dense, "
                "output.dense, pooler.dense (BERT/RoBERTa/MiniLM) or q_lin, k_lin, v_lin, out_lin, lin1, "
                "lin2 (DistilBERT), or 'all-linear'")
    return (f"unrecognised tensor {key!r}: only LoRA/IA3 weights of the encoder's linear layers and "
            "a linear classifier may be saved; keep modules_to_save=['classifier'] and nothing else")


def _lora_cells(found, module_of, pc, tensors, config) -> dict[str, list[int | None]]:
    """LoRA tensors into Flock's layout; per-module ranks / alphas (rank_pattern, alpha_pattern)
    are zero-padded to the largest rank with each module's scale folded into its B (exact)."""
    r0, alpha0 = int(pc.get("r", 8)), float(pc.get("lora_alpha", pc.get("r", 8)))
    rank_pat, alpha_pat = pc.get("rank_pattern") or {}, pc.get("alpha_pattern") or {}
    rs = pc.get("use_rslora", False)
    per: dict = {}
    for cell, d in found.items():
        if set(d) != {"lora_A", "lora_B"}:
            raise AdapterRejected(f"{module_of[cell]}: needs both lora_A and lora_B (has {sorted(d)})")
        a, b = d["lora_A"], d["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterRejected(f"{module_of[cell]}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                  "do not form a LoRA pair")
        name = module_of[cell]
        r = int(rank_pat.get(_pattern_key(rank_pat, name), r0)) if rank_pat else r0
        if a.shape[0] != r:
            raise AdapterRejected(f"{name}: lora_A has rank {a.shape[0]}, adapter_config.json says {r}")
        alpha = float(alpha_pat.get(_pattern_key(alpha_pat, name), alpha0)) if alpha_pat else alpha0
        per[cell] = (r, alpha / (math.sqrt(r) if rs else r))
    ranks, scales = {r for r, _ in per.values()}, {s for _, s in per.values()}
    uniform = len(ranks) == 1 and len(scales) == 1
    r_max = max(ranks)
    for cell, d in found.items():
        a, b = d["lora_A"], d["lora_B"]
        if not uniform:  # pad to r_max, fold the module's own scale; the layout's scale is 1
            r, s = per[cell]
            a = torch.cat([a, a.new_zeros(r_max - r, a.shape[1])])
            b = torch.cat([b.float() * s, b.new_zeros(b.shape[0], r_max - r, dtype=torch.float32)], 1)
        pre = "pooler" if cell[0] is None else f"layers.{cell[0]}.{cell[1]}"
        tensors[f"{pre}.lora_A"], tensors[f"{pre}.lora_B"] = a, b
    if uniform:
        # Flock scales by alpha/r; rsLoRA by alpha/sqrt(r)
        config.update(r=r_max, alpha=next(iter(scales)) * r_max)
    else:
        config.update(r=r_max, alpha=float(r_max))
    out: dict[str, list] = {}
    for layer, site in found:
        out.setdefault(site, []).append(layer)
    return out


def _pattern_key(patterns, name: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): first pattern matching a suffix of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _ia3_cells(found, tensors) -> dict[str, list[int | None]]:
    """PEFT keeps (out, 1) for output scaling and (1, in) for input scaling (feedforward_modules)."""
    out: dict[str, list] = {}
    for (layer, site), d in found.items():
        if set(d) != {"ia3_l"}:
            raise AdapterRejected(f"IA3 adapter holds {sorted(d)} on {site}")
        t = d["ia3_l"]
        if t.dim() != 2 or 1 not in t.shape:
            raise AdapterRejected(f"IA3 vector on {site} has shape {tuple(t.shape)}; expected (out, 1) or (1, in)")
        mode = "in" if t.shape[0] == 1 and t.shape[1] > 1 else "out"
        entry = f"{site}.{mode}"
        tensors[f"{site}.{mode}_scale" if layer is None else f"layers.{layer}.{site}.{mode}_scale"] = t.reshape(-1)
        out.setdefault(entry, []).append(layer)
    return out


def _place(config: dict, cells: dict[str, list[int | None]]) -> None:
    """sites + layers when every entry covers the same layers, else sites + site_layers."""
    config["sites"] = sorted(cells)
    per_layer = {e: sorted(ls) for e, ls in cells.items() if ls != [None]}
    layer_sets = {tuple(ls) for ls in per_layer.values()}
    if len(layer_sets) <= 1:
        if layer_sets:
            config["layers"] = list(next(iter(layer_sets)))
    else:
        config["site_layers"] = per_layer
