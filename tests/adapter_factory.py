"""Test helpers that build real adapters: PEFT LoRA on the real MiniLM, and native deltas."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from schema.layout import BaseDims, expected_tensors

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def make_peft_lora(model_dir: Path, out: Path, *, r: int = 4, labels: int = 3, seed: int = 0,
                   targets=("query", "value"), task: str = "SEQ_CLS") -> Path:
    """A LoRA made by the `peft` package itself, with non-zero B so that it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    model = cls.from_pretrained(str(model_dir), num_labels=labels)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  task_type=task, modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


def random_delta(pet_type: str, config: dict, dims: BaseDims, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in expected_tensors(pet_type, config, dims):
        if spec.dtype == "uint8":
            out[spec.name] = torch.randint(0, 256, spec.shape, generator=g, dtype=torch.uint8)
        elif spec.dtype == "int":
            out[spec.name] = torch.arange(0, 64, 7, dtype=torch.int64)
        elif spec.shape is None:
            out[spec.name] = torch.randn(len(range(0, 64, 7)), generator=g) * 0.01
        else:
            out[spec.name] = torch.randn(spec.shape, generator=g) * 0.02
    return out


def write_native(out: Path, pet_type: str, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "flock_adapter.json").write_text(json.dumps({"pet_type": pet_type, "config": config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
    return out
