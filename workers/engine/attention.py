"""Self-attention over packed, unpadded sequences (bidirectional, no mask inside a sequence).

CUDA: torch's flash varlen kernel (``varlen_attn``) on strided q/k/v views of the fused QKV output,
or plain flash SDPA when every sequence has the same length. CPU (and fallback): pad per batch,
SDPA with a key-padding mask, unpad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch on the GPU box
    _varlen_attn = None

_varlen_ok = True


def packed_attention(qkv: torch.Tensor, plan, heads: int) -> torch.Tensor:
    """qkv: [T, 3h] (q | k | v). Returns the context [T, h]."""
    global _varlen_ok
    T, h3 = qkv.shape
    h = h3 // 3
    d = h // heads
    q, k, v = (qkv[:, j * h:(j + 1) * h].view(T, heads, d) for j in range(3))
    B, L = plan.num_seqs, plan.max_len
    if qkv.is_cuda:
        if B * L == T:  # all sequences equally long: a plain dense batch
            qb, kb, vb = (t.view(B, L, heads, d).transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(T, h)
        if _varlen_ok and _varlen_attn is not None and qkv.dtype in (torch.float16, torch.bfloat16):
            try:
                return _varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, L, L).reshape(T, h)
            except (RuntimeError, TypeError, NotImplementedError):
                _varlen_ok = False  # this build/GPU lacks it: use the padded path from now on
    return _padded_attention(q, k, v, plan, heads, d)


def _padded_attention(q, k, v, plan, heads, d):
    T = q.shape[0]
    B, L = plan.num_seqs, plan.max_len
    qp, kp, vp = (t[plan.pad_idx].transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    lens = plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]
    keep = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep[:, None, None, :])
    out = out.transpose(1, 2).reshape(B * L, heads * d)
    return out.index_select(0, plan.valid_flat)
