"""Per-tenant sparse PET types batched in Triton: diff-pruning and MaskBERT of many tenants in one
launch per (layer, site group).

Both work on a bank-less PET group: its rows are contiguous per tenant; the host cuts each
tenant's rows into tiles of at most TILE_M tokens, (start, end, k) with k the tenant's index in
the group, and ships a pointer table [tenants, 3 (diff) | 2 (MaskBERT)] of each tenant's device tensors (the tensors
stay where the pool put them: no per-batch copy of tenant data). The layout of those tensors is
built once at load time by ``pets/diff.py`` / ``pets/maskbert.py`` (header of int offsets first,
read by the kernel for the program's layer and site group).

* ``diff_add``: y[rows] += x[rows] ΔW_tᵀ (+ bias_t). ΔW_t is packed per output block of
  ``block_n`` columns (pets/diff.BLOCK_N), nonzeros sorted by input column (coalesced gathers
  of x), one int32 per nonzero (in << 8 | column inside the block) + its value. A program owns (tile, output block):
  gathers x[rows, in] for CH nonzeros at a time and scatters them into its columns with one
  tensor-core dot against a [CH, BN] one-hot matrix holding the values (exact: each product is
  x·v accumulated in fp32).
* ``masked_linear``: y[rows] = x[rows] (W ⊙ M_t)ᵀ + b, the base weight tile masked in registers
  with the tenant's bits (little bit order over the row-major [N, K] weight of the site group).
  Recompute rather than subtract the masked-out part: one GEMM over the group's rows, no
  cancellation, and the shared GEMM skips these rows (encoder "linear_replace" hook).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.engine.kernels import interpret
from workers.engine.plan import TILE_M

# Launch configs, measured on the H200 by bench/gpu_check.py (sparse rows); the interpreter uses small ones.
DIFF_CONFIG = {"CH": 32, "num_warps": 4}
MASK_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


@triton.jit(do_not_specialize=["n_tiles", "hdr"])
def _diff_kernel(x_ptr, y_ptr, tab_ptr, tiles_ptr, n_tiles, hdr, stride_xm, stride_ym, N,
                 BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    start = tl.load(tiles_ptr + pid)
    end = tl.load(tiles_ptr + n_tiles + pid)
    k = tl.load(tiles_ptr + 2 * n_tiles + pid)
    meta = tl.load(tab_ptr + 3 * k).to(tl.pointer_type(tl.int32))
    vals = tl.load(tab_ptr + 3 * k + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
    bias = tl.load(tab_ptr + 3 * k + 2).to(tl.pointer_type(y_ptr.dtype.element_ty))
    code_base = tl.load(meta)
    blk_off = tl.load(meta + 1 + 2 * hdr)
    bias_off = tl.load(meta + 2 + 2 * hdr)
    if (blk_off >= 0) | (bias_off >= 0):
        rows = start + tl.arange(0, BM)
        rmask = rows < end
        cl = tl.arange(0, BN)
        cols = nb * BN + cl
        cmask = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if blk_off >= 0:
            p0 = tl.load(meta + blk_off + nb)
            p1 = tl.load(meta + blk_off + nb + 1)
            for c0 in range(p0, p1, CH):
                j = c0 + tl.arange(0, CH)
                jm = j < p1
                code = tl.load(meta + code_base + j, mask=jm, other=0)
                v = tl.load(vals + j, mask=jm, other=0.0)
                xg = tl.load(x_ptr + rows[:, None] * stride_xm + (code >> 8)[None, :],
                             mask=rmask[:, None] & jm[None, :], other=0.0)
                onehot = tl.where((code & 255)[:, None] == cl[None, :], v[:, None].to(xg.dtype),
                                  tl.zeros((CH, BN), dtype=xg.dtype))
                if IEEE:
                    acc += tl.dot(xg, onehot, input_precision="ieee")
                else:
                    acc += tl.dot(xg, onehot)
        if bias_off >= 0:
            acc += tl.load(bias + bias_off + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        m = rmask[:, None] & cmask[None, :]
        yp = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        y = tl.load(yp, mask=m, other=0.0)
        tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=m)


def diff_add(x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, tiles: torch.Tensor, n_tiles: int,
             hdr: int, block_n: int, cfg: dict | None = None) -> None:
    """y [n_tok, N] += sparse deltas of the tenants in ``table`` on their tiles' rows; ``hdr``: the
    (layer, site group) entry of each tenant's header. ``cfg``: launch config (sweeps)."""
    assert x.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    N = y.shape[1]
    cfg = cfg or ({"CH": 16, "num_warps": 1} if interpret() else DIFF_CONFIG)
    grid = (n_tiles, triton.cdiv(N, block_n))
    _diff_kernel[grid](x, y, table, tiles, n_tiles, hdr, x.stride(0), y.stride(0), N, BM=TILE_M,
                       BN=block_n, IEEE=x.dtype == torch.float32, **cfg)


@triton.jit(do_not_specialize=["n_tiles", "hdr", "replace"])
def _masked_kernel(x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr, tiles_ptr, n_tiles, hdr, replace,
                   stride_xm, stride_wn, stride_ym, N, K, IEEE: tl.constexpr,
                   BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    start = tl.load(tiles_ptr + pid)
    end = tl.load(tiles_ptr + n_tiles + pid)
    k = tl.load(tiles_ptr + 2 * n_tiles + pid)
    meta = tl.load(tab_ptr + 2 * k).to(tl.pointer_type(tl.int64))
    bits = tl.load(tab_ptr + 2 * k + 1).to(tl.pointer_type(tl.uint8))
    off = tl.load(meta + hdr)  # byte offset of this (layer, site group)'s mask, -1: none (W as is)
    if (off >= 0) | (replace != 0):
        rows = start + tl.arange(0, BM)
        rmask = rows < end
        nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        mb = bits + tl.maximum(off, 0)
        bmask = nmask & ((nn * 0 + off) >= 0)  # rows whose mask bytes exist (none: all ones)
        acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # branch-free body: an unmasked tenant reads all-ones bytes
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            wm = nmask[:, None] & kmask[None, :]
            w = tl.load(w_ptr + nn[:, None] * stride_wn + kk[None, :], mask=wm, other=0.0)
            bit = nn[:, None] * K + kk[None, :]
            byte = tl.load(mb + (bit >> 3), mask=bmask[:, None] & kmask[None, :], other=255)
            w = tl.where(((byte >> (bit & 7).to(tl.uint8)) & 1) != 0, w, tl.zeros_like(w))
            if IEEE:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w))
        acc += tl.load(b_ptr + nn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


def masked_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, table: torch.Tensor,
                  tiles: torch.Tensor, n_tiles: int, hdr: int, replace: bool, cfg: dict | None = None) -> None:
    """y[tile rows] = x (W ⊙ M_t)ᵀ + b for each tile's tenant; a tenant without a mask at ``hdr``
    gets x Wᵀ + b when ``replace`` (the shared GEMM skipped its rows), else its rows stay."""
    assert x.stride(-1) == 1 and w.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    N, K = w.shape
    cfg = cfg or ({"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 1} if interpret() else MASK_CONFIG)
    grid = (n_tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    _masked_kernel[grid](x, w, b, y, table, tiles, n_tiles, hdr, int(replace), x.stride(0), w.stride(0),
                         y.stride(0), N, K, IEEE=x.dtype == torch.float32, BM=TILE_M, **cfg)
