"""Self-attention over packed, unpadded sequences (bidirectional, no mask inside a sequence).

CUDA: torch's flash varlen kernel (``varlen_attn``) on strided q/k/v views of the fused QKV output,
or plain flash SDPA when every sequence has the same length. CPU (and fallback): pad per batch,
SDPA with a key-padding mask, unpad. Which varlen kernel runs follows ``EngineOptions.varlen_attn``;
what "auto" timed, and which flash call works on this build, is kept in the encoder's ``Tuned``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch on the GPU box
    _varlen_attn = None


def packed_attention(qkv: torch.Tensor, plan, heads: int, options, tuned) -> torch.Tensor:
    """qkv: [T, 3h] (q | k | v). Returns the context [T, h]. options: EngineOptions; tuned: Tuned."""
    T, h3 = qkv.shape
    h = h3 // 3
    d = h // heads
    q, k, v = (qkv[:, j * h:(j + 1) * h].view(T, heads, d) for j in range(3))
    B, L = plan.num_seqs, plan.max_len
    if qkv.is_cuda:
        if B * L == T:  # all sequences equally long: a plain dense batch
            qb, kb, vb = (t.view(B, L, heads, d).transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(T, h)
        if qkv.dtype in (torch.float16, torch.bfloat16):
            impl = _pick(qkv, q, k, v, plan, heads, L, options, tuned)
            if impl == "triton":
                return _triton_varlen(qkv, plan, heads)
            if tuned.flash_mode != "padded":
                out = _cuda_varlen(q, k, v, plan.cu_seqlens, L, tuned)
                if out is not None:
                    return out.reshape(T, h)
    elif _interpret_ok(options):  # tests: the Triton kernel on CPU through the interpreter
        return _triton_varlen(qkv, plan, heads)
    return _padded_attention(q, k, v, plan, heads, d)


def _interpret_ok(options) -> bool:
    from workers.engine.kernels import interpret, triton_available
    return interpret() and triton_available() and options.varlen_attn != "flash"


def _seq_bounds(plan):
    """[start, end) token range of each token's sequence (device, cached on the plan)."""
    if plan.seq_bounds is None:
        cu = plan.cu_seqlens.long()
        plan.seq_bounds = (cu.index_select(0, plan.tok_seq), cu.index_select(0, plan.tok_seq + 1))
    return plan.seq_bounds


def _triton_varlen(qkv, plan, heads):
    from workers.engine.kernels.triton_attn import packed_attention as tri
    s, e = _seq_bounds(plan)
    return tri(qkv, s, e, heads)


def _pick(qkv, q, k, v, plan, heads, L, options, tuned) -> str:
    """Which varlen kernel to use; "auto" times both once (first varlen batch) and keeps the faster."""
    from workers.engine.kernels import time_us, triton_available
    if options.varlen_attn == "flash" or not triton_available():
        return "flash"
    if options.varlen_attn == "triton":
        return "triton"
    if tuned.varlen is None:
        fns = {"triton": lambda: _triton_varlen(qkv, plan, heads)}
        if tuned.flash_mode != "padded":
            fns["flash"] = lambda: _cuda_varlen(q, k, v, plan.cu_seqlens, L, tuned)
        times = {}
        for name, fn in fns.items():
            try:
                fn()  # first call builds / tunes; time_us makes the second warm-up call
                times[name] = time_us(fn, 5) / 1e3
            except Exception as exc:  # a kernel that does not build here is simply not chosen
                times[name] = float("inf")
                tuned.varlen_ms[name + "_error"] = repr(exc)[:200]
        if "flash" in times and tuned.flash_mode == "padded":
            times["flash"] = float("inf")
        tuned.varlen_ms.update(times)
        tuned.varlen = min(times, key=times.get) if times.get("triton", float("inf")) < float("inf") else "flash"
    return tuned.varlen


def _cuda_varlen(q, k, v, cu, L, tuned):
    """Try the flash varlen paths once each (strided views, then contiguous copies); remember the winner."""
    tries = []
    if _varlen_attn is not None:
        tries += [("varlen", False), ("varlen", True)]
    tries += [("aten", False), ("aten", True)]
    if tuned.flash_mode is not None:
        tries = [t for t in tries if f"{t[0]}:{t[1]}" == tuned.flash_mode]
    for name, contig in tries:
        qq, kk, vv = (t.contiguous() for t in (q, k, v)) if contig else (q, k, v)
        try:
            if name == "varlen":
                out = _varlen_attn(qq, kk, vv, cu, cu, L, L)
            else:
                out = torch.ops.aten._flash_attention_forward(qq, kk, vv, cu, cu, L, L, 0.0, False, False)[0]
            tuned.flash_mode = f"{name}:{contig}"
            return out
        except (RuntimeError, TypeError, NotImplementedError, AttributeError):
            continue
    tuned.flash_mode = "padded"  # no flash varlen on this build/GPU: padded SDPA from now on
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
