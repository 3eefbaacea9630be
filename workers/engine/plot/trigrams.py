"""Tri-gram windows and keys of packed sequences: whole-tensor ops on the ids' device.

Token t of a sequence has the window (x[t-1], x[t], x[t+1]); a neighbour outside the sequence is
EDGE (-1). A window's key packs the three ids shifted by one (EDGE -> 0) in base vocab + 1, an
int64 as long as (vocab + 1)^3 < 2^63 (vocab < 2 million).
"""

from __future__ import annotations

import torch

EDGE = -1


def neighbours(cu64: torch.Tensor, tok_seq: torch.Tensor, local_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_prev, has_next) [T] bool of packed tokens, from cumulative offsets and each token's
    sequence index and position inside it."""
    T = tok_seq.numel()
    has_prev = local_pos > 0
    has_next = torch.arange(1, T + 1, device=tok_seq.device) < cu64.index_select(0, tok_seq + 1)
    return has_prev, has_next


def windows(ids: torch.Tensor, has_prev: torch.Tensor, has_next: torch.Tensor) -> torch.Tensor:
    """[T, 3] int64 (prev, id, next) with EDGE where a neighbour lies outside the sequence."""
    ids = ids.long()
    edge = torch.full_like(ids[:1], EDGE)
    prev = torch.where(has_prev, torch.cat([edge, ids[:-1]]), EDGE)
    nxt = torch.where(has_next, torch.cat([ids[1:], edge]), EDGE)
    return torch.stack([prev, ids, nxt], 1)


def keys(win: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 key per window row."""
    b = vocab + 1
    w = win.long() + 1
    return (w[:, 0] * b + w[:, 1]) * b + w[:, 2]


def unkey(k: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, 3] windows back from keys."""
    b = vocab + 1
    return torch.stack([k // (b * b), (k // b) % b, k % b], 1) - 1
