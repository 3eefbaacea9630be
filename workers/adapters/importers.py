"""Read adapter directories into Flock's layout: PEFT (LoRA, IA3) and Flock's native format.

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (a pickled
``adapter_model.bin`` is refused, never loaded). The classification head comes from
``modules_to_save`` (``classifier``). Native layout: ``flock_adapter.json`` ({"pet_type",
"config"}) + ``adapter.safetensors`` with tensors already named as in ``layout.py``.
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
_HEAD_KEY = re.compile(r"(?:^|\.)(classifier|score)\.(weight|bias)$")
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
        for key, bad in (("use_dora", True), ("bias", "all"), ("bias", "lora_only")):
            if pc.get(key) == bad:
                raise AdapterRejected(f"LoRA with {key}={bad!r} is not supported")
        if pc.get("rank_pattern") or pc.get("alpha_pattern"):
            raise AdapterRejected("per-module rank_pattern/alpha_pattern are not supported")
    raw = _weights(path, PEFT_WEIGHTS, max_bytes)

    tensors: dict[str, torch.Tensor] = {}
    cells: set[tuple[int, str]] = set()
    head: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        m = _LAYER_KEY.search(key)
        if m:
            layer, site, kind = int(m.group(1)), _SITE_OF_MODULE[m.group(2)], m.group(3)
            cells.add((layer, site))
            if kind == "ia3_l":
                # PEFT keeps (out, 1) for output scaling and (1, in) for feed-forward input scaling;
                # Flock's ffn "scale" multiplies the intermediate activation (= ffn_out's input).
                if site == "ffn_out":
                    site = "ffn_in"
                tensors[f"layers.{layer}.{site}.scale"] = t.reshape(-1)
            else:
                tensors[f"layers.{layer}.{site}.{kind}"] = t
            continue
        h = _HEAD_KEY.search(key)
        if h:
            head[h.group(2)] = t
            continue
        raise AdapterRejected(f"unrecognised tensor {key!r} (not a BERT-family LoRA/IA3 or classifier weight)")
    if not cells:
        raise AdapterRejected("no adapter tensors found")
    if set(head) != {"weight", "bias"}:
        raise AdapterRejected("no classification head: train with modules_to_save=['classifier'] "
                              "(a linear classifier with weight and bias)")
    layers = sorted({c[0] for c in cells})
    sites = sorted({c[1] for c in cells})
    if len(cells) != len(layers) * len(sites):
        raise AdapterRejected("adapter must target the same modules in every adapted layer")
    n_labels = head["weight"].shape[0] if head["weight"].dim() == 2 else 0
    tensors["head.weight"], tensors["head.bias"] = head["weight"], head["bias"]
    config: dict[str, Any] = {"task": task, "labels": _labels_for(path, n_labels, labels), "layers": layers}
    if task == "seq_cls":
        config["pooling"] = pooling or "pooler"  # HF *ForSequenceClassification classifies the pooler output
    if peft_type == "LORA":
        r = int(pc.get("r", 8))
        alpha = float(pc.get("lora_alpha", r))
        if pc.get("use_rslora"):
            alpha = alpha * r / math.sqrt(r)  # Flock scales by alpha/r; rsLoRA by alpha/sqrt(r)
        config.update(r=r, alpha=alpha, sites=sites)
        pet_type = "lora"
    else:
        config.update(sites=sorted({"ffn_in" if s == "ffn_out" else s for s in sites}))
        pet_type = "ia3"
    return ImportedAdapter(pet_type, config, tensors, pc.get("base_model_name_or_path"))
