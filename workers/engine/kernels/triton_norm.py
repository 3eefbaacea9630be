"""Row-wise epilogues for the CUDA low-precision path (Triton).

* ``add_layer_norm``: LayerNorm(x + residual), several rows per program (one read of each input,
  one write); optional per-row gamma/beta deltas for the rows [t0, t1) of one PET group, gathered
  by slot inside the kernel (BitFit's LayerNorm deltas keep the fused path for the whole batch);
  optionally also the e4m3 copy of the output for the next GEMM of an FP8 base (``fp8.py``).
* ``rows_affine_``: in place y = act(y * scale[slot(row)] + bias[slot(row)]) on rows [t0, t1),
  optionally act on every row (BitFit bias deltas / IA3 scales without materialising the gathered
  [rows, cols] tensors; BitFit on ffn_in + GELU in one pass).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _ln_configs():
    return [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8))]


@triton.autotune(configs=_ln_configs(), key=["N", "HAS_DELTA", "HAS_Q"])
@triton.jit(do_not_specialize=["T", "t0", "t1"])
def _add_ln_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, T, N, eps, slot_ptr, dw_ptr, db_ptr, t0, t1,
                   stride_dw, stride_db, q_ptr, q_inv, HAS_DELTA: tl.constexpr, HAS_Q: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < T
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    m = rmask[:, None] & cmask[None, :]
    off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    x += tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    d = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    y = d * tl.rsqrt(var + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DELTA:
        inr = rmask & (rows >= t0) & (rows < t1)
        slot = tl.load(slot_ptr + (rows - t0), mask=inr, other=0).to(tl.int64)
        dm = inr[:, None] & cmask[None, :]
        w = w + tl.load(dw_ptr + slot[:, None] * stride_dw + cols[None, :], mask=dm, other=0.0).to(tl.float32)
        b = b + tl.load(db_ptr + slot[:, None] * stride_db + cols[None, :], mask=dm, other=0.0).to(tl.float32)
    y = y * w + b
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)
    if HAS_Q:  # the next GEMM's e4m3 input: quantised from the rounded output, as a separate pass would
        yq = y.to(out_ptr.dtype.element_ty).to(tl.float32) * q_inv
        yq = tl.minimum(tl.maximum(yq, -448.0), 448.0)
        tl.store(q_ptr + off, yq.to(q_ptr.dtype.element_ty), mask=m)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                   delta=None, q_inv_scale: float | None = None):
    """LayerNorm(x + residual) over the last dim; x, residual contiguous [T, N].
    delta: None or (t0, t1, tok_slots [t1-t0], d_gamma [slots, N], d_beta [slots, N]) (last dim contiguous).
    q_inv_scale: also return the output's e4m3 copy (x / scale, saturated): (out, out_e4m3)."""
    assert x.is_contiguous() and residual.is_contiguous()
    T, N = x.shape
    out = torch.empty_like(x)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if q_inv_scale is not None else None
    if T == 0:
        return out if q is None else (out, q)
    block = triton.next_power_of_2(N)
    if delta is not None:
        t0, t1, slots, dw, db = delta
        assert dw.stride(-1) == 1 and db.stride(-1) == 1
        extra = (slots, dw, db, t0, t1, dw.stride(0), db.stride(0))
    else:
        extra = (x, x, x, 0, 0, 0, 0)
    args = (x, residual, w, b, out, T, N, eps) + extra + ((q, q_inv_scale) if q is not None else (x, 1.0))
    flags = {"HAS_DELTA": delta is not None, "HAS_Q": q is not None, "BLOCK": block}

    def grid(meta):
        return (triton.cdiv(T, meta["ROWS"]),)
    if INTERPRET:
        _add_ln_kernel.fn[grid](*args, ROWS=4, **flags)
    else:
        _add_ln_kernel[grid](*args, **flags)
    return out if q is None else (out, q)


@triton.jit(do_not_specialize=["T", "t0", "t1"])
def _rows_affine_kernel(y_ptr, slot_ptr, s_ptr, b_ptr, T, N, t0, t1, stride_y, stride_s, stride_b,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < T
    cmask = cols < N
    m = rmask[:, None] & cmask[None, :]
    yp = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    y = tl.load(yp, mask=m, other=0.0).to(tl.float32)
    inr = rmask & (rows >= t0) & (rows < t1)
    slot = tl.load(slot_ptr + (rows - t0), mask=inr, other=0).to(tl.int64)
    dm = inr[:, None] & cmask[None, :]
    if HAS_SCALE:
        y = y * tl.load(s_ptr + slot[:, None] * stride_s + cols[None, :], mask=dm, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + slot[:, None] * stride_b + cols[None, :], mask=dm, other=0.0).to(tl.float32)
    if ACT == 1:  # GELU, tanh approximation (same as the cuBLASLt epilogue)
        c = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * c) - 1.0))
    elif ACT == 2:  # exact GELU
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=m)


ACTS = {"none": 0, "gelu_tanh": 1, "gelu": 2}


def rows_affine_(y: torch.Tensor, t0: int, t1: int, tok_slots: torch.Tensor, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
    """In place on y [T, N] (last dim contiguous). Rows [t0, t1) get y * scale[slot] + bias[slot]
    (scale/bias [slots, N], last dim contiguous). act (if any) runs on every row, else only [t0, t1)."""
    assert y.stride(-1) == 1
    code = ACTS[act]
    lo, hi = (0, y.shape[0]) if code else (t0, t1)
    view = y[lo:hi]
    T, N = view.shape
    if T == 0:
        return y
    s = scale if scale is not None else y
    b = bias if bias is not None else y
    bm, bn = 16, 256
    grid = (triton.cdiv(T, bm), triton.cdiv(N, bn))
    _rows_affine_kernel[grid](view, tok_slots, s, b, T, N, t0 - lo, t1 - lo, y.stride(0),
             s.stride(0) if scale is not None else 0, b.stride(0) if bias is not None else 0,
             HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=code, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y
