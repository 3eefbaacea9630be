"""SGMV-style segmented shrink / expand in Triton (LoRA and bottleneck adapters).

Tokens of a PET group are sorted by slot; the host cuts each same-slot segment into tiles of at
most TILE_M tokens (plan.TILE_M) and ships (start, end, slot) per tile. One program handles one
tile (x one output block), loads that slot's weights once and runs tensor-core dots: one launch
per (group, site group) whatever the number of tenants, no per-token weight gathers, no padding
of ranks beyond the bank's bucket.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from workers.engine.kernels import time_us
from workers.engine.plan import TILE_M

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3}
_cols_cache: dict = {}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return x


def _configs(names, grid):
    import itertools
    out = []
    for vals in itertools.product(*grid):
        *blocks, warps, stages = vals
        out.append(triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages))
    return out


# Tuned once per shape on first use; the expand adds into y in place, so autotuning restores it.
@triton.autotune(configs=_configs(["BLOCK_K"], [(64, 128), (4, 8), (2, 3)]), key=["K", "R"])
@triton.jit(do_not_specialize=["n_tiles"])
def _shrink_kernel(x_ptr, w_ptr, b_ptr, out_ptr, tiles_ptr, n_tiles,
                   stride_xm, stride_ws, stride_wr, stride_bs, stride_om, K, R,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    start = tl.load(tiles_ptr + pid)
    end = tl.load(tiles_ptr + n_tiles + pid)
    slot = tl.load(tiles_ptr + 2 * n_tiles + pid)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rrmask = rr < R
    w_base = w_ptr + slot * stride_ws
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base + rr[:, None] * stride_wr + kk[None, :], mask=rrmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot * stride_bs + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]
    acc = _act(acc, ACT)
    tl.store(out_ptr + rows[:, None] * stride_om + rr[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & rrmask[None, :])


@triton.autotune(configs=_configs(["BLOCK_N"], [(64, 128, 256), (4, 8), (1, 2)]), key=["N", "RB"],
                 restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["n_tiles"])
def _expand_kernel(xa_ptr, w_ptr, b_ptr, y_ptr, cols_ptr, tiles_ptr, n_tiles,
                   stride_xm, stride_ws, stride_wm, stride_wn, stride_bs, stride_bm, stride_ym,
                   N, RB,
                   HAS_BIAS: tl.constexpr, COLS_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    member = pid_n // n_blocks_n
    nb = pid_n % n_blocks_n
    start = tl.load(tiles_ptr + pid)
    end = tl.load(tiles_ptr + n_tiles + pid)
    slot = tl.load(tiles_ptr + 2 * n_tiles + pid)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    w_base = w_ptr + slot * stride_ws + member * stride_wm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, RB, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmr = rr < RB
        xa = tl.load(xa_ptr + rows[:, None] * stride_xm + (member * RB + rr)[None, :],
                     mask=rmask[:, None] & rmr[None, :], other=0.0)
        w = tl.load(w_base + nn[:, None] * stride_wn + rr[None, :], mask=nmask[:, None] & rmr[None, :], other=0.0)
        acc += tl.dot(xa, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot * stride_bs + member * stride_bm + nn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    col0 = tl.load(cols_ptr + member)
    if COLS_ALIGNED:  # lets the compiler vectorise the read-modify-write of y (16-byte accesses)
        col0 = tl.multiple_of(col0, 16)
    m = rmask[:, None] & nmask[None, :]
    yp = y_ptr + rows[:, None] * stride_ym + (col0 + nn)[None, :]
    y = tl.load(yp, mask=m, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=m)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def sgmv_shrink(x: torch.Tensor, A: torch.Tensor, tiles: torch.Tensor, n_tiles: int,
                bias: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
    """x [n_tok, K] (row-major rows), A [slots, R, K] (last dim contiguous) -> act(x A^T + b) [n_tok, R]."""
    assert x.stride(-1) == 1 and A.stride(-1) == 1
    n_tok, K = x.shape
    R = A.shape[1]
    out = torch.empty(n_tok, R, device=x.device, dtype=x.dtype)
    if n_tiles == 0:
        return out
    br = _pow2(R, 16, 64)
    b = bias if bias is not None else A
    grid = (n_tiles, triton.cdiv(R, br))
    kern, kw = (_shrink_kernel.fn, {"BLOCK_K": 32}) if INTERPRET else (_shrink_kernel, {})
    kern[grid](x, A, b, out, tiles, n_tiles, x.stride(0), A.stride(0), A.stride(1),
               b.stride(0), out.stride(0), K, R, HAS_BIAS=bias is not None, ACT=ACT_CODES[act],
               BLOCK_M=TILE_M, BLOCK_R=br, **kw)
    return out


def sgmv_expand_add(xa: torch.Tensor, B: torch.Tensor, tiles: torch.Tensor, n_tiles: int, y: torch.Tensor,
                    cols: list[int], bias: torch.Tensor | None = None) -> None:
    """y[:, cols[m] + j] += xa[:, m*RB:(m+1)*RB] @ B[slot, m]^T (+ bias[slot, m]); B [slots, M, N, RB]."""
    assert xa.stride(-1) == 1 and B.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    members, N, RB = B.shape[1], B.shape[2], B.shape[3]
    key = (tuple(cols), y.device)
    cols_t = _cols_cache.get(key)
    if cols_t is None:
        cols_t = _cols_cache[key] = torch.tensor(cols, dtype=torch.int64, device=y.device)
    b = bias if bias is not None else B
    sbs, sbm = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)

    def grid(meta):
        return (n_tiles, members * triton.cdiv(N, meta["BLOCK_N"]))
    kern, kw = (_expand_kernel.fn, {"BLOCK_N": 32}) if INTERPRET else (_expand_kernel, {})
    kern[grid](
        xa, B, b, y, cols_t, tiles, n_tiles, xa.stride(0), B.stride(0), B.stride(1), B.stride(2), sbs, sbm,
        y.stride(0), N, RB, HAS_BIAS=bias is not None, COLS_ALIGNED=all(c % 16 == 0 for c in cols),
        BLOCK_M=TILE_M, BLOCK_R=_pow2(RB, 16, 64), **kw)


def _init_prune(configs, named_args, **kwargs):
    n = named_args["N"]
    ok = [c for c in configs if n % c.kwargs["BLOCK_N"] == 0]
    return ok or configs[:1]


@triton.autotune(configs=_configs(["BLOCK_N"], [(32, 64, 128, 256), (4, 8), (2,)]), key=["N", "NY", "RB"],
                 prune_configs_by={"early_config_prune": _init_prune})
@triton.jit(do_not_specialize=["n_tiles"])
def _expand_init_kernel(xa_ptr, w_ptr, bias_ptr, y_ptr, sec_ptr, tiles_ptr, n_tiles,
                        stride_xm, stride_ws, stride_wm, stride_wn, stride_ym, N, NY, RB,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[rows, :] = bias + (xa[:, member] @ B[slot, member]^T in the member's column section).
    Writes every column of its rows (no read of y): the base GEMM then accumulates into it (beta=1)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tiles_ptr + pid)
    end = tl.load(tiles_ptr + n_tiles + pid)
    slot = tl.load(tiles_ptr + 2 * n_tiles + pid)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    c0 = pid_n * BLOCK_N
    section = c0 // N  # BLOCK_N divides N: a block lies in one section
    member = tl.load(sec_ptr + section)
    nn = c0 - section * N + tl.arange(0, BLOCK_N)
    yc = c0 + tl.arange(0, BLOCK_N)
    cmask = yc < NY
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if member >= 0:
        w_base = w_ptr + slot * stride_ws + member * stride_wm
        for r0 in range(0, RB, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            rmr = rr < RB
            xa = tl.load(xa_ptr + rows[:, None] * stride_xm + (member * RB + rr)[None, :],
                         mask=rmask[:, None] & rmr[None, :], other=0.0)
            w = tl.load(w_base + nn[:, None] * stride_wn + rr[None, :], mask=cmask[:, None] & rmr[None, :], other=0.0)
            acc += tl.dot(xa, tl.trans(w))
    acc += tl.load(bias_ptr + yc, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + yc[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


_sec_cache: dict = {}


def sgmv_expand_init(xa: torch.Tensor, B: torch.Tensor, tiles: torch.Tensor, n_tiles: int, y: torch.Tensor,
                     cols: list[int], base_bias: torch.Tensor) -> None:
    """y[rows] = base_bias + LoRA delta (members at columns cols[m], each B.shape[2] wide); y [n, NY]
    covers the group's rows only; every column is written. B [slots, M, N, RB]."""
    assert xa.stride(-1) == 1 and B.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    members, N, RB = B.shape[1], B.shape[2], B.shape[3]
    NY = y.shape[1]
    assert NY % N == 0 and all(c % N == 0 for c in cols)
    key = (tuple(cols), N, NY, y.device)
    sec = _sec_cache.get(key)
    if sec is None:
        m = [-1] * (NY // N)
        for i, c in enumerate(cols):
            m[c // N] = i
        sec = _sec_cache[key] = torch.tensor(m, dtype=torch.int64, device=y.device)

    def grid(meta):
        return (n_tiles, triton.cdiv(NY, meta["BLOCK_N"]))
    args = (xa, B, base_bias, y, sec, tiles, n_tiles, xa.stride(0), B.stride(0), B.stride(1), B.stride(2),
            y.stride(0), N, NY, RB)
    br = _pow2(RB, 16, 64)
    if INTERPRET:
        bn = next(b for b in (64, 32, 16, 8) if N % b == 0)
        _expand_init_kernel.fn[grid](*args, BLOCK_M=TILE_M, BLOCK_N=bn, BLOCK_R=br)
    else:
        _expand_init_kernel[grid](*args, BLOCK_M=TILE_M, BLOCK_R=br)


# ---- fused LoRA shrink + expand ---------------------------------------------------------------
# One program per (token tile [x row sub-block], column split): xa = x[rows] @ A[slot]^T is computed
# once and kept in registers (R = members * rb <= 64 columns: tiny), then the program walks its
# column blocks of every member and adds xa @ B[slot, member]^T into y in place. x is read once,
# y read and written once, no xa round trip through memory and one launch instead of two. The
# member's B block is loaded into the member's rank columns of a [BLOCK_N, BLOCK_R] tile (zeros
# elsewhere), so one dot over the stacked rank axis gives that member's delta.
FUSED_MAX_R = 64


@triton.jit(do_not_specialize=["n_tiles"])
def _fused_lora_kernel(x_ptr, a_ptr, b_ptr, y_ptr, cols_ptr, tiles_ptr, n_tiles,
                       stride_xm, stride_as, stride_ar, stride_bs, stride_bm, stride_bn, stride_ym,
                       K, R, N, RB, MEMBERS,
                       COLS_ALIGNED: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                       PREFETCH: tl.constexpr = False):
    pid_s = tl.program_id(0)  # (row sub-block, column split) of one tile: neighbours share x in L2
    pid_t = tl.program_id(1)
    sub = pid_s // SPLIT
    sp = pid_s % SPLIT
    start = tl.load(tiles_ptr + pid_t) + sub * BLOCK_M
    end = tl.load(tiles_ptr + n_tiles + pid_t)
    if start < end:
        slot = tl.load(tiles_ptr + 2 * n_tiles + pid_t)
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < end
        rr = tl.arange(0, BLOCK_R)
        rrmask = rr < R
        a_base = a_ptr + slot * stride_as
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            a = tl.load(a_base + rr[:, None] * stride_ar + kk[None, :], mask=rrmask[:, None] & kmask[None, :],
                        other=0.0)
            xa += tl.dot(x, tl.trans(a))
        xa_lo = xa.to(x_ptr.dtype.element_ty)  # same rounding as the shrink kernel's xa output
        n_nb = tl.cdiv(N, BLOCK_N)
        total = MEMBERS * n_nb
        per = tl.cdiv(total, SPLIT)
        j0 = sp * per
        j1 = tl.minimum(total, j0 + per)
        b_base = b_ptr + slot * stride_bs
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
        if PREFETCH:  # software double buffer: block j+1's y load is in flight while block j is stored
            member = j0 // n_nb
            nn = (j0 - member * n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
            col0 = tl.load(cols_ptr + tl.minimum(member, MEMBERS - 1))  # an empty split (j0 == j1) loads nothing
            if COLS_ALIGNED:
                col0 = tl.multiple_of(col0, 16)
            y = tl.load(y_rows + (col0 + nn)[None, :], mask=(rmask & ((rows * 0 + j0) < j1))[:, None] & (nn < N)[None, :],
                        other=0.0)
            for j in range(j0, j1):
                member = j // n_nb
                nn = (j - member * n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
                nmask = nn < N
                col0 = tl.load(cols_ptr + member)
                if COLS_ALIGNED:
                    col0 = tl.multiple_of(col0, 16)
                jn = j + 1
                mem_n = jn // n_nb
                nn_n = (jn - mem_n * n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
                col_n = tl.load(cols_ptr + tl.minimum(mem_n, MEMBERS - 1))
                if COLS_ALIGNED:
                    col_n = tl.multiple_of(col_n, 16)
                y_next = tl.load(y_rows + (col_n + nn_n)[None, :],
                                 mask=(rmask & ((rows * 0 + jn) < j1))[:, None] & (nn_n < N)[None, :], other=0.0)
                rl = rr - member * RB
                wmask = nmask[:, None] & ((rl >= 0) & (rl < RB))[None, :]
                w = tl.load(b_base + member * stride_bm + nn[:, None] * stride_bn + rl[None, :], mask=wmask,
                            other=0.0)
                d = tl.dot(xa_lo, tl.trans(w))
                tl.store(y_rows + (col0 + nn)[None, :], (y.to(tl.float32) + d).to(y_ptr.dtype.element_ty),
                         mask=rmask[:, None] & nmask[None, :])
                y = y_next
        else:
            for j in range(j0, j1):
                member = j // n_nb
                nn = (j - member * n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
                nmask = nn < N
                col0 = tl.load(cols_ptr + member)
                if COLS_ALIGNED:
                    col0 = tl.multiple_of(col0, 16)
                m = rmask[:, None] & nmask[None, :]
                yp = y_rows + (col0 + nn)[None, :]
                y = tl.load(yp, mask=m, other=0.0)  # issued first: its latency overlaps the B load + dot
                rl = rr - member * RB
                wmask = nmask[:, None] & ((rl >= 0) & (rl < RB))[None, :]
                w = tl.load(b_base + member * stride_bm + nn[:, None] * stride_bn + rl[None, :], mask=wmask,
                            other=0.0)
                d = tl.dot(xa_lo, tl.trans(w))
                tl.store(yp, (y.to(tl.float32) + d).to(y_ptr.dtype.element_ty), mask=m)


# (BLOCK_M, BLOCK_N, SPLIT, num_warps, num_stages[, PREFETCH]); BLOCK_K = 128 (less when K is small).
# First H200 sweep (512x128 tokens, q,v r8, us per call): (32,128,1,4,2) 161, (64,128,1,4,2) 165,
# (16,256,1,4,2) 177, (32,256,1,4,2) 179, (64,256,1,8,2) 224, SPLIT=2 192-267: small per-iteration
# tiles and many programs win (latency-bound RMW), so the list leans that way.
FUSED_CONFIGS = [(64, 128, 1, 4, 2), (32, 128, 1, 4, 2), (32, 128, 1, 8, 2), (32, 64, 1, 4, 2), (16, 128, 1, 4, 2),
                 (32, 128, 1, 2, 2), (16, 256, 1, 4, 2), (32, 256, 1, 4, 2),
                 (32, 128, 1, 4, 2, True), (64, 128, 1, 4, 2, True), (16, 128, 1, 4, 2, True), (32, 64, 1, 4, 2, True),
                 (32, 256, 2, 4, 2)]
_fused_best: dict = {}  # tuning key -> config
fused_timings: dict = {}  # tuning key (str) -> {config: us}, filled by the one-time tuning (bench reads it)


def cols_tensor(cols, device):
    key = (tuple(cols), device)
    t = _cols_cache.get(key)
    if t is None:
        t = _cols_cache[key] = torch.tensor(cols, dtype=torch.int64, device=device)
    return t


def fused_ok(A: torch.Tensor, B: torch.Tensor) -> bool:
    """The fused kernel keeps the whole stacked rank axis in registers: R <= 64."""
    return A.shape[1] <= FUSED_MAX_R and A.shape[1] == B.shape[1] * B.shape[3]


def sgmv_lora_fused(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tiles: torch.Tensor, n_tiles: int,
                    y: torch.Tensor, cols: list[int], config: tuple | None = None) -> None:
    """y[:, cols[m] + j] += (x @ A[slot]^T)[:, m*RB:(m+1)*RB] @ B[slot, m]^T, shrink and expand in one kernel.
    x [n_tok, K], A [slots, M*RB, K], B [slots, M, N, RB], y [n_tok, >= max(cols) + N] (row stride free).
    ``config`` = (BLOCK_M, BLOCK_N, SPLIT, warps, stages[, PREFETCH]) forces a config; otherwise the best config for
    this shape is measured once on a scratch copy of y (no autotuner restore copies in the timing)."""
    assert x.stride(-1) == 1 and A.stride(-1) == 1 and B.stride(-1) == 1 and y.stride(-1) == 1
    assert fused_ok(A, B)
    if n_tiles == 0:
        return
    K = x.shape[1]
    R, members, N, RB = A.shape[1], B.shape[1], B.shape[2], B.shape[3]
    cols_t = cols_tensor(cols, y.device)
    br = _pow2(R, 16, FUSED_MAX_R)
    bk = 128 if K >= 128 else _pow2(K, 16, 128)
    aligned = all(c % 16 == 0 for c in cols) and y.stride(0) % 16 == 0

    def launch(cfg, yy):
        bm, bn, split, warps, stages = cfg[:5]
        pf = len(cfg) > 5 and bool(cfg[5])
        grid = ((TILE_M // bm) * split, n_tiles)
        args = (x, A, B, yy, cols_t, tiles, n_tiles, x.stride(0), A.stride(0), A.stride(1), B.stride(0),
                B.stride(1), B.stride(2), yy.stride(0), K, R, N, RB, members)
        kw = dict(COLS_ALIGNED=aligned, TILE=TILE_M, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, SPLIT=split,
                  PREFETCH=pf)
        if INTERPRET:
            _fused_lora_kernel[grid](*args, **kw)
        else:
            _fused_lora_kernel[grid](*args, **kw, num_warps=warps, num_stages=stages)

    if config is None:
        if INTERPRET:
            config = (32, 32, 2, 4, 1, True)  # row sub-blocks, column splits, multi-member blocks, prefetch
        else:
            key = (K, R, N, RB, members, x.dtype, aligned, max(n_tiles, 1).bit_length())
            config = _fused_best.get(key)
            if config is None:
                config = _fused_best[key] = _tune_fused(key, launch, y)
    launch(config, y)


def _tune_fused(key, launch, y) -> tuple:
    scratch = y.clone()  # the kernel adds in place: time it on a copy, never on the live buffer
    times = {}
    for cfg in FUSED_CONFIGS:
        try:
            times[cfg] = time_us(lambda: launch(cfg, scratch))
        except Exception as exc:  # a config that does not build here is simply not chosen
            times[cfg] = float("inf")
            fused_timings.setdefault("errors", []).append(repr(exc)[:160])
    del scratch
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        best = FUSED_CONFIGS[0]
    fused_timings[str(key)] = {str(c): round(t, 1) for c, t in times.items()} | {"best": str(best)}
    return best
