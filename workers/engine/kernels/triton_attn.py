"""Packed attention for variable-length sequences that shares query tiles across short sequences.

The packed layout puts sequences back to back. One program handles BLOCK_M consecutive query
tokens (whatever sequences they belong to) and one head, and walks only the key range spanned by
those sequences ([start of the first one, end of the last one)), masking keys outside each query's
own sequence (block-diagonal mask). FA2's varlen kernel instead runs at least one full query tile
per sequence, which wastes most of it when sequences are short. Online softmax in fp32 (exp2).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    out = []
    for bm, bn, w, s in ((128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


@triton.autotune(configs=_configs(), key=["HEAD_DIM"])
@triton.jit(do_not_specialize=["T"])
def _packed_attn_kernel(qkv_ptr, out_ptr, s_ptr, e_ptr, T, stride_t, stride_o, H_COLS, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    q0 = pid_m * BLOCK_M
    rows = q0 + tl.arange(0, BLOCK_M)
    rmask = rows < T
    last = tl.minimum(q0 + BLOCK_M, T) - 1
    kv_lo = tl.load(s_ptr + q0)
    kv_hi = tl.load(e_ptr + last)
    s_i = tl.load(s_ptr + rows, mask=rmask, other=0)
    e_i = tl.load(e_ptr + rows, mask=rmask, other=0)
    dd = tl.arange(0, HEAD_DIM)
    rows64 = rows.to(tl.int64)
    q = tl.load(qkv_ptr + rows64[:, None] * stride_t + head * HEAD_DIM + dd[None, :], mask=rmask[:, None], other=0.0)
    k_base = qkv_ptr + H_COLS + head * HEAD_DIM
    v_base = qkv_ptr + 2 * H_COLS + head * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(kv_lo, kv_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < kv_hi
        c64 = cols.to(tl.int64)
        k = tl.load(k_base + c64[:, None] * stride_t + dd[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(v_base + c64[:, None] * stride_t + dd[None, :], mask=cmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        valid = (cols[None, :] >= s_i[:, None]) & (cols[None, :] < e_i[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + rows64[:, None] * stride_o + head * HEAD_DIM + dd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])


def packed_attention(qkv: torch.Tensor, seq_start: torch.Tensor, seq_end: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [T, 3h] (q | k | v, row stride arbitrary, last dim contiguous); seq_start/seq_end [T]: the
    [start, end) token range of each token's sequence (non-decreasing). Returns the context [T, h]."""
    assert qkv.stride(-1) == 1
    T, h3 = qkv.shape
    h = h3 // 3
    d = h // heads
    out = torch.empty(T, h, device=qkv.device, dtype=qkv.dtype)
    if T == 0:
        return out
    qk_scale = (1.0 / math.sqrt(d)) * 1.4426950408889634

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), heads)
    args = (qkv, out, seq_start, seq_end, T, qkv.stride(0), out.stride(0), h, qk_scale)
    if INTERPRET:  # CPU interpreter (tests): no autotuning
        _packed_attn_kernel.fn[grid](*args, HEAD_DIM=d, BLOCK_M=64, BLOCK_N=32)
    else:
        _packed_attn_kernel[grid](*args, HEAD_DIM=d)
    return out
