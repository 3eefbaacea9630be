"""Building a skipping base: distil the shallow part on an unlabelled corpus, then tabulate the
corpus's tri-grams.

Distillation (SkipBERT's recipe without its MLM): the teacher is the full base model; the student
is the shallow part (init ``ShallowWeights.init_from``) whose assembled states feed the base's own
upper layers, frozen. Loss = MSE(assembled, teacher layer-K states) + MSE(student final states,
teacher final states), over real tokens. The upper layers stay the base's, so a tenant trained on
the full model's layers >= K runs unchanged on the skipping base.

Resumable: every ``ckpt_every`` steps the shallow weights, Adam's moments and the position in the
run go to ``OUT/.plot_ckpt`` (safetensors + JSON, no pickle); a rerun continues from there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workers.engine.derived import read_corpus, write_derived_base
from workers.engine.model_loading import BaseWeights, load_base
from workers.engine.plot import PLOT_FILE, TABLE_FILE
from workers.engine.plot import trigrams as tg
from workers.engine.plot.shallow import ShallowWeights, assemble, dense_layer, window_states

CKPT_DIR = ".plot_ckpt"
ProgressFn = Callable[[str, int, int, dict], None]  # (phase, done, total, info)


@dataclass
class DistilSpec:
    skip: int
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 128
    lr: float = 1e-4
    upper_weight: float = 1.0  # weight of the final-layer term
    seed: int = 0
    ckpt_every: int = 200
    max_steps: int | None = None
    max_entries: int = 2_000_000  # table rows kept (most frequent tri-grams first)
    table_dtype: str = "float16"
    device: str = "cpu"


def tokenize(model_dir: str, texts: list[str], max_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    return tok(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]


def _padded(ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(x) for x in ids)
    t = torch.zeros(len(ids), L, dtype=torch.long)
    m = torch.zeros(len(ids), L, dtype=torch.bool)
    for i, x in enumerate(ids):
        t[i, :len(x)] = torch.tensor(x)
        m[i, :len(x)] = True
    return t.to(device), m.to(device)


def full_states(base: BaseWeights, ids: torch.Tensor, mask: torch.Tensor, upto: int, start: int = 0,
                x: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states after layer ``upto`` of a padded batch (from the embeddings, or from x after
    layer ``start``), token type 0."""
    if x is None:
        B, L = ids.shape
        pos = torch.arange(base.position_offset, base.position_offset + L, device=ids.device)
        x = base.word_emb[ids] + base.pos_emb[pos]
        if base.type_emb is not None:
            x = x + base.type_emb[0]
        x = F.layer_norm(x, (x.shape[-1],), base.emb_ln_w, base.emb_ln_b, base.eps)
    for lw in base.layers[start:upto]:
        x = dense_layer(x, mask, lw, base.dims.heads, base.activation, base.eps)
    return x


def student_states(base: BaseWeights, sw: ShallowWeights, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Assembled layer-K states [B, L, h] (zero at padding) of a padded batch through the shallow part."""
    B, L = ids.shape
    flat = ids[mask]
    lens = mask.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.long, device=ids.device)
    cu[1:] = lens.cumsum(0)
    tok_seq = torch.repeat_interleave(torch.arange(B, device=ids.device), lens)
    local = torch.arange(flat.numel(), device=ids.device) - cu[tok_seq]
    has_prev, has_next = tg.neighbours(cu, tok_seq, local)
    win = tg.windows(flat, has_prev, has_next)
    uniq, inv = torch.unique(tg.keys(win, base.word_emb.shape[0]), return_inverse=True)
    vals = window_states(base, sw, tg.unkey(uniq, base.word_emb.shape[0]))
    s = assemble(vals[inv], has_prev, has_next, local, None, sw, base.eps)
    out = torch.zeros(B, L, s.shape[-1], device=ids.device, dtype=s.dtype)
    return out.masked_scatter(mask.unsqueeze(-1), s)


def _save_ckpt(out: Path, sw: ShallowWeights, opt: torch.optim.Adam, state: dict) -> None:
    d = out / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    moments = {}
    for j, p in enumerate(sw.params()):
        st = opt.state.get(p)
        if st:
            moments[f"{j}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{j}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            state["adam_step"] = float(st["step"])
    save_file({k: v.cpu() for k, v in sw.tensors().items()}, str(d / "weights.tmp"))
    save_file({k: v.cpu() for k, v in moments.items()} or {"none": torch.zeros(1)}, str(d / "adam.tmp"))
    os.replace(d / "weights.tmp", d / "weights.safetensors")
    os.replace(d / "adam.tmp", d / "adam.safetensors")
    (d / "state.json").write_text(json.dumps(state))  # written last: names a complete checkpoint


def distil(base_dir: str, texts: list[str], spec: DistilSpec, out: Path,
           progress: ProgressFn | None = None) -> tuple[ShallowWeights, dict]:
    """Train the shallow part; returns it (fp32, CPU) and the run's summary."""
    dev = torch.device(spec.device)
    base = load_base(base_dir).to(dev, torch.float32)
    sw = ShallowWeights.init_from(base, spec.skip).to(dev, torch.float32)
    ids = tokenize(base_dir, texts, spec.max_length)
    steps_per_epoch = math.ceil(len(ids) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    if spec.max_steps is not None:
        total = min(total, spec.max_steps)
    state = {"step": 0, "skip": spec.skip, "losses": []}
    ck = out / CKPT_DIR / "state.json"
    params = sw.params()
    if ck.exists():
        state = json.loads(ck.read_text())
        if state.get("skip") != spec.skip:
            raise ValueError(f"{ck}: a checkpoint for skip {state.get('skip')}, not {spec.skip}")
        sw = ShallowWeights.from_tensors(load_file(str(out / CKPT_DIR / "weights.safetensors")), spec.skip).to(
            dev, torch.float32)
        params = sw.params()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=spec.lr)
    if ck.exists() and state["step"]:
        m = load_file(str(out / CKPT_DIR / "adam.safetensors"))
        for j, p in enumerate(params):
            if f"{j}.exp_avg" in m:
                opt.state[p] = {"step": torch.tensor(state.get("adam_step", state["step"])),
                                "exp_avg": m[f"{j}.exp_avg"].to(dev), "exp_avg_sq": m[f"{j}.exp_avg_sq"].to(dev)}
    K, Lyr = spec.skip, base.dims.layers
    step = state["step"]
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(spec.seed + epoch)
        perm = torch.randperm(len(ids), generator=g)[k * spec.batch_size:(k + 1) * spec.batch_size].tolist()
        x, mask = _padded([ids[i] for i in perm], dev)
        with torch.no_grad():
            tK = full_states(base, x, mask, K)
            tL = full_states(base, x, mask, Lyr, K, tK)
        sK = student_states(base, sw, x, mask)
        sL = full_states(base, x, mask, Lyr, K, sK)
        lk = F.mse_loss(sK[mask], tK[mask])
        lL = F.mse_loss(sL[mask], tL[mask])
        loss = lk + spec.upper_weight * lL
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        state["step"] = step
        lk, lL = float(lk.detach()), float(lL.detach())
        state["losses"].append([round(lk, 6), round(lL, 6)])
        if progress:
            progress("distil", step, total, {"loss_k": lk, "loss_final": lL})
        if step % spec.ckpt_every == 0 or step == total:
            _save_ckpt(out, sw, opt, state)
    sw = ShallowWeights.from_tensors({k: v.detach().cpu() for k, v in sw.tensors().items()}, spec.skip)
    losses = state["losses"]
    return sw, {"steps": step, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


@torch.no_grad()
def corpus_table(base_dir: str, sw: ShallowWeights, texts: list[str], spec: DistilSpec,
                 progress: ProgressFn | None = None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [N], values [N, 3, h]) of the corpus's tri-grams, most frequent first."""
    dev = torch.device(spec.device)
    base = load_base(base_dir).to(dev, torch.float32)
    swd = sw.to(dev, torch.float32)
    V = base.word_emb.shape[0]
    all_keys = []
    for seq in tokenize(base_dir, texts, spec.max_length):
        all_keys.append(torch.tensor(seq))
    lens = torch.tensor([len(s) for s in all_keys])
    flat = torch.cat(all_keys)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.long)
    cu[1:] = lens.cumsum(0)
    tok_seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    local = torch.arange(flat.numel()) - cu[tok_seq]
    hp, hn = tg.neighbours(cu, tok_seq, local)
    uniq, counts = torch.unique(tg.keys(tg.windows(flat, hp, hn), V), return_counts=True)
    keys = uniq[torch.argsort(counts, descending=True, stable=True)][:spec.max_entries]
    vals = torch.empty(keys.numel(), 3, base.dims.hidden, dtype=getattr(torch, spec.table_dtype))
    for j in range(0, keys.numel(), chunk):
        k = keys[j:j + chunk].to(dev)
        vals[j:j + chunk] = window_states(base, swd, tg.unkey(k, V)).cpu()
        if progress:
            progress("table", min(j + chunk, keys.numel()), keys.numel(), {})
    return keys, vals


def write_base(base_dir: str, out: Path, sw: ShallowWeights, meta: dict,
               table: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The derived base directory (config.json gains ``flock_plot``), the shallow part and the table."""
    write_derived_base(base_dir, out, "flock_plot", meta)
    save_file(sw.tensors(), str(out / PLOT_FILE), metadata={"flock_plot": json.dumps(meta)})
    if table is not None:
        keys, vals = table
        save_file({"keys": keys.contiguous(), "values": vals.contiguous()}, str(out / TABLE_FILE))


def build_skipping_base(base_id: str, base_dir: str, out: Path, corpus: Sequence[str], spec: DistilSpec,
                        progress: ProgressFn | None = None) -> dict:
    """Distil, tabulate, write ``out`` (a base directory); returns a summary. Rerun to resume."""
    texts = read_corpus(corpus)
    sw, run = distil(base_dir, texts, spec, out, progress)
    table = corpus_table(base_dir, sw, texts, spec, progress)
    meta = {"base": base_id, "skip": spec.skip, "corpus": [str(c) for c in corpus], "texts": len(texts),
            "steps": run["steps"], "loss_first": run["first_loss"], "loss_last": run["last_loss"],
            "table_rows": int(table[0].numel()), "table_dtype": spec.table_dtype}
    write_base(base_dir, out, sw, meta, table)
    return {"out": str(out), **meta,
            "table_bytes": int(table[1].numel() * table[1].element_size())}
