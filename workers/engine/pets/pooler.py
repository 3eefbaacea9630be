"""PET deltas on the base model's pooler dense (PEFT ``target_modules="all-linear"`` on a
``*ForSequenceClassification`` BERT includes ``pooler.dense``): LoRA and IA3 (input / output).

Applied on the pre-tanh pooler output of each group's sequences (one row per sequence), only for
tenants that pool with "pooler" (the only pooling that runs the pooler). Per group: one gathered
batched matmul pair (LoRA) or one gathered multiply (IA3), whatever the tenant count.
"""

from __future__ import annotations

import numpy as np
import torch


def _has(g) -> bool:
    b = g.bank
    return b is not None and (b.get("A.pooler") is not None or b.get("pooler.in") is not None
                              or b.get("pooler.out") is not None)


def active(plan) -> bool:
    return any(_has(g) for g in plan.groups)


def apply(plan, cls: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """cls: [B, h] [CLS] hidden state of every sorted sequence; z: [B, h] = cls W^T + b, in place."""
    for g in plan.groups:
        if not _has(g):
            continue
        j, k = (int(v) for v in np.searchsorted(plan.cu_host, (g.seg.t0, g.seg.t1)))
        slots, bank = g.seg.seq_slots, g.bank
        x = cls[j:k]
        s_in = bank.get("pooler.in")
        if s_in is not None:
            z[j:k] = torch.addmm(b, x * s_in.index_select(0, slots), w.t())
        A = bank.get("A.pooler")
        if A is not None:
            xa = torch.bmm(x.unsqueeze(1), A.index_select(0, slots).transpose(1, 2))  # [n, 1, rb]
            z[j:k] += torch.bmm(xa, bank.get("B.pooler").index_select(0, slots).transpose(1, 2)).squeeze(1)
        s_out = bank.get("pooler.out")
        if s_out is not None:
            z[j:k] *= s_out.index_select(0, slots)
