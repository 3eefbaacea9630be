"""The trainer's Python API (used by `flockserve adapter train` and the jobs trainer).

    ex = load_examples("data.jsonl", task="seq_cls")
    result = train("sentence-transformers/all-MiniLM-L6-v2", ex, TrainSpec(pet_type="lora"))
    record = register(result, "acme")            # validated + stored like an import

Training runs the engine's own forward (workers/engine: Encoder, PET ops, heads) with autograd
on a one-tenant bank whose tensors derive from leaf parameters in Flock's layout, so served
outputs equal the trainer's evaluation outputs (see docs/training.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from schema import layout

from workers.trainer.data import Examples, TrainDataError, load_examples

__all__ = ["TrainSpec", "TrainResult", "Progress", "TrainDataError", "Examples", "load_examples",
           "train", "register", "FULL"]

FULL = "full"  # full fine-tuning (bench baseline only: not a PET type, cannot be registered)


@dataclass
class TrainSpec:
    """What to train and how. ``pet_config`` holds the PET's own options in the layout's names
    (lora: r, alpha, sites, layers; adapter: variant, bottleneck, activation, layers; ia3: sites,
    layers; bitfit: layers, ln; diff: sites, layers, density, retrain_epochs, probe; maskbert: sites,
    layers, init_sparsity, threshold, probe, score_init). Defaults per type: DEFAULT_PET_CONFIG."""

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
    test_examples: Examples | None = None  # scored once at the end (metrics["test"]); never used to select
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

# Per-type defaults: PET options in the layout's names, plus the trainer's own (TRAINER_OPTIONS).
DEFAULT_PET_CONFIG: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16, "sites": ["q", "v"]},
    "adapter": {"variant": "pfeiffer", "bottleneck": 64, "activation": "relu"},
    "bitfit": {"ln": True},
    "ia3": {"sites": ["k", "v", "ffn_in"]},
    "diff": {"density": 0.005, "retrain_epochs": 2, "probe": 0.1},
    "maskbert": {"threshold": 5e-3, "init_sparsity": 0.0, "probe": 0.1, "score_init": "constant"},
    FULL: {},
}
TRAINER_OPTIONS = ("ln", "density", "retrain_epochs", "threshold", "init_sparsity", "probe", "score_init")
# MaskBERT has none: its scores' lr follows from the run's length (pets.MaskBert.auto_lr).
DEFAULT_LR = {"lora": 1e-3, "adapter": 1e-3, "bitfit": 2e-3, "ia3": 5e-3, "diff": 2e-4, FULL: 1e-4}
DEFAULT_HEAD_LR = 2e-3
# Learning rate per role of a trainable tensor (Trainable.param_groups): "pet" is the spec's lr;
# bias deltas (diff-pruning's re-training) train like BitFit's.
ROLE_LR = {"bias": DEFAULT_LR["bitfit"]}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no GPU")
    return dev


def layout_config(spec: TrainSpec, labels: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stored adapter config, the trainer-only options) of a spec."""
    if spec.pet_type not in DEFAULT_PET_CONFIG:
        raise ValueError(f"unknown PET type {spec.pet_type!r}; one of {list(DEFAULT_PET_CONFIG)}")
    merged = {**DEFAULT_PET_CONFIG[spec.pet_type], **spec.pet_config}
    opts = {k: merged.pop(k) for k in TRAINER_OPTIONS if k in merged}
    cfg = {"task": spec.task, "labels": list(labels), **merged}
    if spec.task == "seq_cls":
        cfg["pooling"] = spec.pooling
    if spec.pet_type != FULL:
        try:
            layout.validate_config(spec.pet_type, cfg)
        except layout.LayoutError as e:
            raise ValueError(str(e)) from None
    return cfg, opts


def _tokenize(tok, ex: Examples, label_ix: dict[str, int], max_length: int):
    """-> (ids, type ids or None, targets): seq_cls targets [n]; token_cls a list per row with
    -100 where no word starts (special tokens, continuation pieces)."""
    if ex.task == "seq_cls":
        ids: list = [None] * len(ex)
        tts: list = [None] * len(ex)
        for pair in (False, True):  # one batched tokenizer call per kind (as serving tokenises)
            idx = [i for i, p in enumerate(ex.pairs) if (p is not None) == pair]
            if not idx:
                continue
            enc = tok([ex.texts[i] for i in idx], [ex.pairs[i] for i in idx] if pair else None,
                      truncation=True, max_length=max_length, return_attention_mask=False)
            for j, i in enumerate(idx):
                ids[i] = enc["input_ids"][j]
                tts[i] = enc["token_type_ids"][j] if "token_type_ids" in enc else None
        targets = [label_ix[y] for y in ex.labels]
    else:
        enc = tok(ex.tokens, is_split_into_words=True, truncation=True, max_length=max_length,
                  return_attention_mask=False)
        ids, tts, targets = list(enc["input_ids"]), enc.get("token_type_ids"), []
        for r, tags in enumerate(ex.tags):
            prev, row = None, []
            for w in enc.word_ids(r):
                row.append(label_ix[tags[w]] if w is not None and w != prev else -100)
                prev = w
            targets.append(row)
        tts = list(tts) if tts is not None else None
    if tts is not None and any(t is None for t in tts):
        tts = None
    return ids, tts, targets


def _metrics(pred: np.ndarray, true: np.ndarray, labels: list[str]) -> dict[str, Any]:
    per, f1s = {}, []
    for k, name in enumerate(labels):
        sup, prd = int((true == k).sum()), int((pred == k).sum())
        cor = int(((true == k) & (pred == k)).sum())
        per[name] = {"support": sup, "predicted": prd, "correct": cor}
        if sup or prd:  # macro-F1 over the labels that occur (in truth or prediction)
            f1s.append(2 * cor / (sup + prd))
    return {"accuracy": float((pred == true).mean()) if true.size else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0, "per_label": per}


def train(base_model_id: str, examples: Examples, spec: TrainSpec, progress: ProgressFn | None = None,
          models_dir: Path | None = None) -> TrainResult:
    """Train a delta of spec.pet_type plus its head on the frozen base; raises TrainDataError on
    unusable data, ValueError on a bad spec, ModelNotFound for an unknown base model."""
    from workers.engine.model_loading import load_base
    from workers.engine.tokenize import BatchTokenizer
    from workers.models import resolve_model_dir
    from workers.trainer.forward import Batch, TenantForward
    from workers.trainer.pets import KINDS, Head, final_logits

    t_start = time.perf_counter()
    if examples.task != spec.task:
        raise TrainDataError(f"the data is for {examples.task}, the spec for {spec.task}")
    if spec.epochs < 1 or spec.batch_size < 1 or spec.max_length < 8:
        raise ValueError("epochs and batch size must be >= 1, max length >= 8")
    labels = list(spec.labels) if spec.labels else sorted(examples.label_set())
    examples.check_labels(labels)
    for extra in (spec.val_examples, spec.test_examples):
        if extra is not None:
            extra.check_labels(labels)
    if len(labels) < 2:
        raise TrainDataError(f"training needs at least 2 distinct labels, the data has {labels}")
    cfg, opts = layout_config(spec, labels)
    device = _resolve_device(spec.device)
    if models_dir is None:
        from workers.config import settings
        models_dir = settings().models_dir
    model_dir = resolve_model_dir(base_model_id, models_dir)
    torch.manual_seed(spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)

    # ---- data: split, tokenise
    if spec.val_examples is not None:
        train_ex, val_ex = examples, spec.val_examples
    else:
        if not 0 < spec.val_split < 1:
            raise ValueError("val_split must be in (0, 1) when no validation set is given")
        perm = rng.permutation(len(examples))
        n_val = max(1, int(round(spec.val_split * len(examples))))
        if len(examples) - n_val < 1:
            raise TrainDataError(f"{len(examples)} rows: too few to hold out a validation split")
        val_ex, train_ex = examples.subset(perm[:n_val].tolist()), examples.subset(perm[n_val:].tolist())
    tok = BatchTokenizer(str(model_dir), spec.max_length).tok
    label_ix = {y: k for k, y in enumerate(labels)}
    tr_ids, tr_tts, tr_y = _tokenize(tok, train_ex, label_ix, spec.max_length)
    va_ids, va_tts, va_y = _tokenize(tok, val_ex, label_ix, spec.max_length)
    te = _tokenize(tok, spec.test_examples, label_ix, spec.max_length) if spec.test_examples is not None else None

    def batch_of(ids, tts, rows):
        return Batch([ids[i] for i in rows], [tts[i] for i in rows] if tts is not None else None)

    def target_of(ys, rows):
        if spec.task == "seq_cls":
            return torch.tensor([ys[i] for i in rows], device=device)
        return torch.tensor([t for i in rows for t in ys[i]], device=device)

    # ---- model: the engine's forward on the frozen base, the PET's leaf tensors, the head
    base = load_base(str(model_dir))
    fwd = TenantForward(base, device)
    tr = KINDS[spec.pet_type](spec.pet_type, cfg, fwd, g, opts)
    head = Head(cfg, fwd.dims, g, device)
    lr = spec.lr or DEFAULT_LR.get(spec.pet_type)  # None: tr.auto_lr of each phase
    head_lr = spec.head_lr or DEFAULT_HEAD_LR
    n_train = len(tr_ids)
    steps_per_epoch = -(-n_train // spec.batch_size)
    history: list[dict[str, Any]] = []
    lrs: dict[str, float] = {}  # the delta's lr per phase (reported)

    def evaluate(final: bool = False, data=None) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, tts, ys = data or (va_ids, va_tts, va_y)
        outs = []
        with torch.no_grad():
            for s in range(0, len(ids), spec.batch_size):
                rows = list(range(s, min(s + spec.batch_size, len(ids))))
                b = batch_of(ids, tts, rows)
                outs.append((final_logits(tr, b, head) if final else tr.logits(b, head)).float().cpu())
        logits = torch.cat(outs)
        true = target_of(ys, range(len(ids))).cpu()
        keep = true != -100
        return logits, _metrics(logits[keep].argmax(-1).numpy(), true[keep].numpy(), labels)

    def run_phase(phase: str, epochs: int) -> int:
        total = epochs * steps_per_epoch
        if spec.max_steps:
            total = min(total, spec.max_steps)

        def schedule(start: int):
            n = total - start
            warm = max(1, int(spec.warmup * n))
            return lambda k: 0.0 if k < start else min((k - start + 1) / warm, max(0.0, (total - k) / max(1, n - warm)))

        # The head alone trains for the first tr.probe(phase) of the steps (linear probing, then
        # the delta): a random head's gradient would push the delta just as hard, and wrongly.
        start = int(tr.probe(phase) * total)
        pet_lr = lr if lr is not None else tr.auto_lr(sum(schedule(start)(k) for k in range(total)))
        roles = [(r, ps) for r, ps in {**tr.param_groups(phase), "head": head.params()}.items() if ps]
        groups = [{"params": ps, "lr": head_lr if r == "head" else ROLE_LR.get(r, pet_lr)} for r, ps in roles]
        opt = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [schedule(0 if r == "head" else start) for r, _ in roles])
        lrs[phase] = pet_lr
        step, best, best_state, best_epoch, bad = 0, -1.0, None, 0, 0
        for ep in range(1, epochs + 1):
            order = rng.permutation(n_train)
            t_ep = time.perf_counter()
            losses = []
            for s in range(0, n_train, spec.batch_size):
                if step >= total:
                    break
                rows = order[s:s + spec.batch_size].tolist()
                logits = tr.logits(batch_of(tr_ids, tr_tts, rows), head)
                loss = F.cross_entropy(logits, target_of(tr_y, rows), ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                if progress:
                    progress(Progress(phase, ep, epochs, step, total, losses[-1]))
            secs = time.perf_counter() - t_ep
            _, m = evaluate()
            history.append({"phase": phase, "epoch": ep, "loss": float(np.mean(losses)) if losses else None,
                            "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "seconds": secs})
            if progress:
                progress(Progress(phase, ep, epochs, step, total, history[-1]["loss"], m["accuracy"], m["macro_f1"]))
            if m["macro_f1"] > best:
                best, best_epoch, bad = m["macro_f1"], ep, 0
                best_state = (tr.state(), {n: v.detach().clone() for n, v in head.t.items()})
            else:
                bad += 1
                if spec.patience is not None and bad >= spec.patience:
                    break
            if step >= total:
                break
        if best_state is not None and best_epoch != history[-1]["epoch"]:  # keep the best epoch
            tr.load_state(best_state[0])
            with torch.no_grad():
                for n, v in best_state[1].items():
                    head.t[n].copy_(v)
        return best_epoch

    best_epoch = run_phase("train", spec.epochs)
    tr.finish_phase("train")
    if "retrain" in tr.phases and int(opts.get("retrain_epochs", 0)) > 0:
        run_phase("retrain", int(opts["retrain_epochs"]))
    for p in tr.params() + head.params():
        p.requires_grad_(False)

    # ---- final evaluation through the exported tensors, as served
    eval_logits, m = evaluate(final=True)
    # the served path (engine kernels on the exported tensors) against the forward that trained:
    # fp32 on CPU they agree to ~1e-6; a large gap means a kernel disagrees with the training math
    m["served_vs_trained_max_abs"] = float((eval_logits - evaluate()[0]).abs().max()) if len(va_ids) else 0.0
    if te is not None:
        m["test"] = {**evaluate(final=True, data=te)[1], "rows": len(te[0])}
    tensors = {**tr.export(), **{n: v.detach().float().cpu().contiguous() for n, v in head.t.items()}}
    if spec.pet_type == FULL:
        nbytes = tr.nbytes() + sum(v.numel() * 4 for v in head.t.values())
    else:
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    train_secs = [h["seconds"] for h in history]
    metrics = {**m, "pet_type": spec.pet_type, "labels": labels, "train_rows": n_train, "val_rows": len(va_ids),
               "epochs_run": sum(1 for h in history if h["phase"] == "train"), "best_epoch": best_epoch,
               "seconds": time.perf_counter() - t_start,
               "seconds_per_epoch": float(np.mean(train_secs)) if train_secs else None,
               "bytes": nbytes, "device": str(device), "history": history, "trainer_options": opts, "lr": lrs}
    if hasattr(tr, "sparsity"):  # diff-pruning, MaskBERT: fraction of the trained sites' weights unchanged / masked
        metrics["mask_sparsity"] = tr.sparsity()
    eval_index = None
    if spec.task == "token_cls":  # the logits rows are the tokens that start a word
        flat = [(r, j) for r, row in enumerate(va_y) for j, y in enumerate(row)]
        keep = target_of(va_y, range(len(va_ids))).cpu() != -100
        eval_index = [rc for rc, k in zip(flat, keep.tolist()) if k]
        eval_logits = eval_logits[keep]
    return TrainResult(base_model_id, spec.pet_type, cfg if spec.pet_type != FULL else {**cfg}, tensors, metrics,
                       eval_logits, [list(x) for x in va_ids],
                       [list(x) for x in va_tts] if va_tts is not None else None, eval_index)


def register(result: TrainResult, tenant_id: str, activate: bool = True, database_url: str | None = None,
             store=None):
    """Validate and store the result as the tenant's next adapter version exactly like
    `flockserve adapter import` (AdapterStore.import_tensors: same checks, one transaction).
    Returns the AdapterRecord (``.version``). ``store``: an AdapterStore (default: from FLOCK_*)."""
    if result.pet_type == FULL:
        raise ValueError("full fine-tuning is a baseline, not a PET type: nothing to register")
    if store is None:
        from workers.adapters.store import AdapterStore, make_backend
        from workers.config import settings
        from workers.db import session_factory
        s = settings()
        store = AdapterStore(session_factory(database_url), make_backend(s.store_backend, s.store_dir),
                             max_bytes=s.max_adapter_bytes, models_dir=s.models_dir)
    return store.import_tensors(tenant_id, result.pet_type, result.config, result.tensors,
                                result.base_model_id, activate=activate)
