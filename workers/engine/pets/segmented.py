"""Segmented shrink/expand shared by LoRA and bottleneck adapters.

shrink: xa[t] = act(x[t] @ A[slot(t)]^T + a_bias[slot(t)])        A: [slots, R, in]
expand: y[t, col_m:col_m+out] += xa[t, m*rb:(m+1)*rb] @ B[slot(t), m]^T (+ b_bias[slot(t), m])
                                                                   B: [slots, members, out, rb]
On CUDA (Triton available) one launch each over a tile map of same-slot token tiles (SGMV-style);
otherwise gathered batched matmuls over sequences padded to the group's max length. Either way
the launch count does not depend on how many tenants the group holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.kernels import interpret, triton_available

_ACTS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def triton_ok() -> bool:
    return triton_available()


def use_triton(x: torch.Tensor, seg) -> bool:
    """Triton kernels when the plan carries tile maps (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return seg.tiles is not None and (x.is_cuda or interpret()) and triton_available()


def shrink(x: torch.Tensor, A: torch.Tensor, seg, bias: torch.Tensor | None = None,
           act: str = "none") -> torch.Tensor:
    """x: [n_tok, in] (the group's rows); A: [slots, R, in] (one layer). Returns [n_tok, R]."""
    if use_triton(x, seg):
        from workers.engine.kernels.triton_lora import sgmv_shrink
        return sgmv_shrink(x, A, seg.tiles, seg.n_tiles, bias, act)
    Ag = A.index_select(0, seg.seq_slots)  # [n, R, in]
    xp = x[seg.pad_idx]  # [n, L, in]
    xa = torch.baddbmm(bias.index_select(0, seg.seq_slots).unsqueeze(1), xp, Ag.transpose(1, 2)) \
        if bias is not None else torch.bmm(xp, Ag.transpose(1, 2))
    xa = _ACTS[act](xa)
    return xa.reshape(-1, xa.shape[-1]).index_select(0, seg.valid_flat)


def expand_add(xa: torch.Tensor, B: torch.Tensor, seg, y: torch.Tensor, cols: list[int],
               bias: torch.Tensor | None = None) -> None:
    """xa: [n_tok, members*rb]; B: [slots, members, out, rb]; adds into y[:, cols[m]:cols[m]+out]."""
    if use_triton(xa, seg):
        from workers.engine.kernels.triton_lora import sgmv_expand_add
        sgmv_expand_add(xa, B, seg.tiles, seg.n_tiles, y, cols, bias)
        return
    members, out_f, rb = B.shape[1], B.shape[2], B.shape[3]
    Bg = B.index_select(0, seg.seq_slots)  # [n, members, out, rb]
    xp = xa[seg.pad_idx]  # [n, L, members*rb]
    bg = bias.index_select(0, seg.seq_slots) if bias is not None else None
    for m in range(members):
        d = torch.bmm(xp[..., m * rb:(m + 1) * rb], Bg[:, m].transpose(1, 2))
        if bg is not None:
            d = d + bg[:, m].unsqueeze(1)
        d = d.reshape(-1, out_f).index_select(0, seg.valid_flat)
        y[:, cols[m]:cols[m] + out_f] += d
