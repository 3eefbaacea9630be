"""The trainer's Python API (used by `flockserve adapter train` and the jobs trainer).

    ex = load_examples("data.jsonl", task="seq_cls")
    result = train("sentence-transformers/all-MiniLM-L6-v2", ex, TrainSpec(pet_type="lora"))
    record = register(result, "acme")            # validated + stored like an import

Training runs the engine's own forward (workers/engine: Encoder, PET ops, heads) with autograd
on a one-tenant bank whose tensors derive from leaf parameters in Flock's layout, so served
outputs equal the trainer's evaluation outputs (see docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from workers.trainer.data import Examples, TrainDataError, load_examples

__all__ = ["TrainSpec", "TrainResult", "Progress", "TrainDataError", "Examples", "load_examples",
           "train", "register", "FULL"]

FULL = "full"  # full fine-tuning (bench baseline only: not a PET type, cannot be registered)


@dataclass
class TrainSpec:
    """What to train and how. ``pet_config`` holds the PET's own options in the layout's names
    (lora: r, alpha, sites, layers; adapter: variant, bottleneck, activation, layers; ia3: sites,
    layers; bitfit: layers, ln; diff: sites, layers, density, retrain_epochs; maskbert: sites,
    layers, init_sparsity, threshold). Defaults per type: DEFAULT_PET_CONFIG."""

    pet_type: str = "lora"
    pet_config: dict[str, Any] = field(default_factory=dict)
    task: str = "seq_cls"
    labels: list[str] | None = None  # None: the labels found in the training data, sorted
    pooling: str = "mean"  # seq_cls: mean | cls | pooler (see schema/layout.py POOLINGS)
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR[pet_type]
    head_lr: float | None = None  # None: DEFAULT_HEAD_LR
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of steps with linear warm-up (then linear decay)
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    val_split: float = 0.1  # used when no validation set is given
    val_examples: Examples | None = None
    patience: int | None = None  # early stopping: epochs without a better val macro-F1
    device: str = "cpu"
    max_steps: int | None = None  # cap on optimiser steps per phase (tests, quick runs)


@dataclass
class Progress:
    """What the progress callback gets, after each step and at each epoch end."""

    phase: str  # "train" | "retrain" (diff-pruning after pruning) | "eval"
    epoch: int
    epochs: int
    step: int  # steps done in this phase
    steps: int  # steps in this phase
    loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None


@dataclass
class TrainResult:
    """A trained delta in Flock's layout (schema/layout.py names), ready for register()."""

    base_model_id: str
    pet_type: str
    config: dict[str, Any]  # layout config: task, labels, pooling + PET options
    tensors: dict[str, torch.Tensor]  # fp32 CPU, layout names incl. head.weight / head.bias
    metrics: dict[str, Any]  # accuracy, macro_f1, per_label {label: {support, predicted, correct}},
    # epochs_run, best_epoch, seconds, seconds_per_epoch, train_rows, val_rows, bytes, history
    eval_logits: torch.Tensor  # seq_cls [n_val, C]; token_cls [tokens scored, C] (see eval_index)
    eval_token_ids: list[list[int]]  # token ids of each validation row, as the trainer fed them
    eval_token_type_ids: list[list[int]] | None
    eval_index: list[tuple[int, int]] | None = None  # token_cls: (row, token position) per logit row


ProgressFn = Callable[[Progress], None]


def train(base_model_id: str, examples: Examples, spec: TrainSpec, progress: ProgressFn | None = None,
          models_dir: Path | None = None) -> TrainResult:
    """Train a delta of spec.pet_type plus its head on the frozen base; raises TrainDataError on
    unusable data, ValueError on a bad spec."""
    raise NotImplementedError


def register(result: TrainResult, tenant_id: str, activate: bool = True, database_url: str | None = None,
             store=None):
    """Validate and store the result as the tenant's next adapter version exactly like
    `flockserve adapter import` (AdapterStore.import_tensors: same checks, one transaction).
    Returns the AdapterRecord (``.version``)."""
    raise NotImplementedError
