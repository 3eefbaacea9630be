"""Task heads: pooling per sequence, then per-tenant heads by gathered batched matmuls.

Heads are banked by kind and label-count bucket; padded label columns are masked out of the
softmax. A one-layer head (bank ``head:c{C}``) is ``W·x + b``; a two-layer sequence head (bank
``head2:{tanh|relu}:c{C}``: RoBERTa / DistilBERT ``*ForSequenceClassification``) first applies
the tenant's dense (h x h) + activation to the pooled vector. Tenants of both kinds share a
batch: the plan makes one head group per head bank.
"""

from __future__ import annotations

import torch

from schema.layout import BaseDims, head_kind
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import pooler as pooler_pets
from workers.engine.pets.common import next_bucket

LABEL_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


_ACT = {"tanh": torch.tanh, "relu": torch.relu}


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    cb = next_bucket(len(cfg["labels"]), LABEL_BUCKETS)
    h = dims.hidden
    specs = {"weight": SlotSpec((cb, h), per_layer=False), "bias": SlotSpec((cb,), per_layer=False)}
    layers, act = head_kind(cfg)
    if layers == 1:
        return BankLayout(f"head:c{cb}", "head", specs)
    specs = {"dense_weight": SlotSpec((h, h), per_layer=False), "dense_bias": SlotSpec((h,), per_layer=False),
             **specs}
    return BankLayout(f"head2:{act}:c{cb}", "head", specs, extra={"activation": act})


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    c = len(delta.config["labels"])
    out["weight"][:c] = t["head.weight"]
    out["bias"][:c] = t["head.bias"]
    if "dense_weight" in out:
        out["dense_weight"].copy_(t["head.dense.weight"])
        out["dense_bias"].copy_(t["head.dense.bias"])
    return out


def pool_hidden(hidden: torch.Tensor, plan, pooler_w, pooler_b) -> torch.Tensor:
    """[B, h] pooled vector of each sorted sequence, following its tenant's pooling."""
    pooled = hidden.index_select(0, plan.cls_rows)
    if plan.mean_rows.numel():
        sums = torch.zeros_like(pooled, dtype=torch.float32).index_add_(0, plan.tok_seq, hidden.float())
        lens = (plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]).to(torch.float32).unsqueeze(1)
        pooled[plan.mean_rows] = (sums / lens).to(hidden.dtype).index_select(0, plan.mean_rows)
    if plan.pooler_rows.numel():
        if pooler_pets.active(plan):  # tenant deltas on the pooler dense: pre-tanh, per group
            cls = hidden.index_select(0, plan.cls_rows)
            z = torch.addmm(pooler_b, cls, pooler_w.t())
            pooler_pets.apply(plan, cls, z, pooler_w, pooler_b)
            pooled[plan.pooler_rows] = torch.tanh(z.index_select(0, plan.pooler_rows))
            return pooled
        cls = pooled.index_select(0, plan.pooler_rows)
        pooled[plan.pooler_rows] = torch.tanh(torch.addmm(pooler_b, cls, pooler_w.t()))
    return pooled


def _masked_softmax(logits: torch.Tensor, nlabels: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(logits.shape[-1], device=logits.device)
    mask = cols >= nlabels.unsqueeze(-1)
    return torch.softmax(logits.float().masked_fill(mask, float("-inf")), dim=-1)


def _dense(hg, x: torch.Tensor) -> torch.Tensor:
    """act(x·Wdᵀ + bd) of a two-layer head group, [n, h] -> [n, h]. Rows are laid out per distinct
    tenant ([u, max rows, h], plan.HeadGroup.dense_*) so each tenant's h x h dense is read once."""
    Wd = hg.bank.get("dense_weight").index_select(0, hg.dense_slots)  # [u, h, h]
    bd = hg.bank.get("dense_bias").index_select(0, hg.dense_slots)
    z = torch.baddbmm(bd.unsqueeze(1), x[hg.dense_idx], Wd.transpose(1, 2))  # [u, m, h]
    z = z.reshape(-1, z.shape[-1]).index_select(0, hg.dense_back)  # back to group row order
    return _ACT[hg.bank.extra["activation"]](z)


def seq_logits(hg, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, Cb] logits and softmax of the group's seq_cls sequences."""
    W = hg.bank.get("weight").index_select(0, hg.seq_slots)  # [n, Cb, h]
    b = hg.bank.get("bias").index_select(0, hg.seq_slots)
    x = pooled.index_select(0, hg.seq_rows)  # [n, h]
    if hg.dense_slots is not None:  # two-layer head: dense + activation first
        x = _dense(hg, x)
    x = x.unsqueeze(1)  # [n, 1, h]
    logits = torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2)).squeeze(1)
    return logits, _masked_softmax(logits, hg.seq_nlabels)


def token_logits(hg, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_tok, Cb] logits and softmax of the group's token_cls tokens (in group order)."""
    W = hg.bank.get("weight").index_select(0, hg.tok_slots)
    b = hg.bank.get("bias").index_select(0, hg.tok_slots)
    x = hidden[hg.tok_pad_idx]  # [n, L, h]
    logits = torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))
    cb = logits.shape[-1]
    nl = hg.tok_nlabels.unsqueeze(1).expand(-1, logits.shape[1])
    logits = logits.reshape(-1, cb).index_select(0, hg.tok_valid_flat)
    return logits, _masked_softmax(logits, nl.reshape(-1).index_select(0, hg.tok_valid_flat))


def compact_results(plan, hidden: torch.Tensor, pooler_w, pooler_b):
    """Every head group's results in ONE float32 device buffer, so one D2H copy serves the batch.

    Layout (C = widest seq label bucket, Ct = widest token label bucket, B = plan.num_seqs, rows in
    the plan's sorted order, Tt = tokens of token_cls sequences, head group after head group):
      seq block [B, 2C+2]: softmax (C, zero padded) | logits (C) | top score | top index
      tok block [Tt, Ct+2]: softmax (Ct, zero padded) | top score | top index
    Returns (buffer, (C, Ct, Tt, [token offset of each token head group])).
    """
    seq_groups = [hg for hg in plan.heads if hg.seq_order]
    tok_groups = [hg for hg in plan.heads if hg.tok_order]
    C = max((hg.bank.get("bias").shape[1] for hg in seq_groups), default=0)
    Ct = max((hg.bank.get("bias").shape[1] for hg in tok_groups), default=0)
    B = plan.num_seqs
    tok_counts = [int(hg.tok_lens_np.sum()) if hg.tok_lens_np is not None else sum(hg.tok_lens) for hg in tok_groups]
    Tt = sum(tok_counts)
    ws, wt = (2 * C + 2 if C else 0), (Ct + 2 if Ct else 0)
    buf = torch.zeros(B * ws + Tt * wt, device=hidden.device, dtype=torch.float32)
    if seq_groups:
        seq_blk = buf[:B * ws].view(B, ws)
        pooled = pool_hidden(hidden, plan, pooler_w, pooler_b)
        for hg in seq_groups:
            logits, probs = seq_logits(hg, pooled)
            n, cb = probs.shape
            part = torch.zeros(n, ws, device=buf.device, dtype=torch.float32)
            part[:, :cb] = probs
            part[:, C:C + cb] = logits
            top, idx = probs.max(-1)
            part[:, 2 * C] = top
            part[:, 2 * C + 1] = idx
            seq_blk.index_copy_(0, hg.seq_rows, part)
    offsets = []
    if tok_groups:
        tok_blk = buf[B * ws:].view(Tt, wt)
        off = 0
        for hg, cnt in zip(tok_groups, tok_counts):
            logits, probs = token_logits(hg, hidden)
            cb = probs.shape[1]
            blk = tok_blk[off:off + cnt]
            blk[:, :cb] = probs
            top, idx = probs.max(-1)
            blk[:, Ct] = top
            blk[:, Ct + 1] = idx
            offsets.append(off)
            off += cnt
    return buf, (C, Ct, Tt, offsets)
