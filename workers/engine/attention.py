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

_mode: str | None = None  # which CUDA varlen path works here, decided on first use


def packed_attention(qkv: torch.Tensor, plan, heads: int) -> torch.Tensor:
    """qkv: [T, 3h] (q | k | v). Returns the context [T, h]."""
    T, h3 = qkv.shape
    h = h3 // 3
    d = h // heads
    q, k, v = (qkv[:, j * h:(j + 1) * h].view(T, heads, d) for j in range(3))
    B, L = plan.num_seqs, plan.max_len
    if qkv.is_cuda:
        if B * L == T:  # all sequences equally long: a plain dense batch
            qb, kb, vb = (t.view(B, L, heads, d).transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(T, h)
        if qkv.dtype in (torch.float16, torch.bfloat16) and _mode != "padded":
            out = _cuda_varlen(q, k, v, plan.cu_seqlens, L)
            if out is not None:
                return out.reshape(T, h)
    return _padded_attention(q, k, v, plan, heads, d)


def _cuda_varlen(q, k, v, cu, L):
    """Try the flash varlen paths once each (strided views, then contiguous copies); remember the winner."""
    global _mode
    tries = []
    if _varlen_attn is not None:
        tries += [("varlen", False), ("varlen", True)]
    tries += [("aten", False), ("aten", True)]
    if _mode is not None:
        tries = [t for t in tries if f"{t[0]}:{t[1]}" == _mode]
    for name, contig in tries:
        qq, kk, vv = (t.contiguous() for t in (q, k, v)) if contig else (q, k, v)
        try:
            if name == "varlen":
                out = _varlen_attn(qq, kk, vv, cu, cu, L, L)
            else:
                out = torch.ops.aten._flash_attention_forward(qq, kk, vv, cu, cu, L, L, 0.0, False, False)[0]
            _mode = f"{name}:{contig}"
            return out
        except (RuntimeError, TypeError, NotImplementedError, AttributeError):
            continue
    _mode = "padded"  # no flash varlen on this build/GPU: padded SDPA from now on
    return None


def _padded_attention(q, k, v, plan, heads, d):
    T = q.shape[0]
    B, L = plan.num_seqs, plan.max_len
    qp, kp, vp = (t[plan.pad_idx].transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    lens = plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]
    keep = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep[:, None, None, :])
    out = out.transpose(1, 2).reshape(B * L, heads * d)
    return out.index_select(0, plan.valid_flat)
