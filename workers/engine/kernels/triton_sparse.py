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
  x·v accumulated in fp32). Those gathers touch 8+ rows per warp load and re-read the tile's x
  once per output block (1.0 ms per call on the H200 at 1/6 of a 512 x 128 batch); the x-staged
  variant (a config with ``G``) reads each [BM, KCH] block of x once, coalesced, for G output
  blocks, and gathers from registers (``tl.gather``). Same packing.
* ``masked_linear``: y[rows] = x[rows] (W ⊙ M_t)ᵀ + b, the base weight tile masked in registers
  with the tenant's bits (little bit order, each row of the site group's [N, K] weight padded to
  whole 16-byte units: pets/maskbert.row_bytes). Recompute rather than subtract the masked-out
  part: one GEMM over the group's rows, no cancellation, and the shared GEMM skips these rows
  (encoder "linear_replace" hook). Per K step a program reads its [BLOCK_N, BLOCK_K] W tile, its
  [BM, BLOCK_K] x tile and the mask as [BLOCK_N, BLOCK_K / 32] int32 words (all three cp.async,
  pipelined): one 4-byte load per 32 weights, where a byte load per weight was 8x redundant,
  unvectorised and not pipelined (2.4 ms per call on the H200 at 1/6 of a 512 x 128 batch). The
  words expand with a broadcast [BLOCK_N, BLOCK_K / 32, 32] bit test reshaped onto the W tile. One
  program per tile of at most BM rows (its own tile map): at BM = 128 the W tile and the mask
  expansion serve twice the rows of the 64-row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.engine.kernels import interpret
from workers.engine.plan import TILE_M

# Launch configs, measured on the H200 by bench/gpu_check.py (sparse rows); the interpreter uses small ones.
DIFF_CONFIG = {"CH": 32, "num_warps": 4}
# MaskBERT, until gpu_check's sweep has measured it: picked from the compiled sm_90 code (Triton 3.9,
# offline): 161 instructions per thread per K step for a 128 x 128 x 32 step (was ~610 for a 64 x 128 x 64
# one), 121 registers and 67 KB of shared memory, so two programs share an SM and one's mask expansion
# overlaps the other's MMAs (a 128 x 128 x 64 step needs 159 registers: one program per SM).
MASK_CONFIG = {"BM": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4}
MASK_INTERPRET_CONFIG = {"BM": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 1}


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


@triton.jit(do_not_specialize=["n_tiles", "hdr"])
def _diff_staged_kernel(x_ptr, y_ptr, tab_ptr, tiles_ptr, n_tiles, hdr, stride_xm, stride_ym, N, K, NB,
                        BM: tl.constexpr, BN: tl.constexpr, KCH: tl.constexpr, G: tl.constexpr,
                        CH: tl.constexpr, IEEE: tl.constexpr):
    """_diff_kernel with x staged: per K chunk the tile's [BM, KCH] x block is read once, coalesced
    (one chunk ahead), and serves the chunk's nonzeros of G packed
    blocks (G * BN output columns) through a register gather. A block's codes ascend (sorted by
    input column), so each block keeps a cursor and takes the codes below the chunk's end."""
    pid = tl.program_id(0)
    nb0 = tl.program_id(1) * G
    start = tl.load(tiles_ptr + pid)
    n_rows = (tl.load(tiles_ptr + n_tiles + pid) - start).to(tl.int32)
    k = tl.load(tiles_ptr + 2 * n_tiles + pid)
    meta = tl.load(tab_ptr + 3 * k).to(tl.pointer_type(tl.int32))
    vals = tl.load(tab_ptr + 3 * k + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
    bias = tl.load(tab_ptr + 3 * k + 2).to(tl.pointer_type(y_ptr.dtype.element_ty))
    code_base = tl.load(meta)
    blk_off = tl.load(meta + 1 + 2 * hdr)
    bias_off = tl.load(meta + 2 + 2 * hdr)
    if (blk_off >= 0) | (bias_off >= 0):
        rows = tl.arange(0, BM)  # tile-local
        rmask = rows < n_rows
        xb = x_ptr + start * stride_xm
        cl = tl.arange(0, G * BN)
        cols = nb0 * BN + cl
        cmask = cols < N
        acc = tl.zeros((BM, G * BN), dtype=tl.float32)
        if blk_off >= 0:
            gi = tl.arange(0, G)
            gm = nb0 + gi < NB
            cur = tl.load(meta + blk_off + nb0 + gi, mask=gm, other=0)  # each block's next nonzero
            bend = tl.load(meta + blk_off + nb0 + gi + 1, mask=gm, other=0)
            kk = tl.arange(0, KCH)
            xn = tl.load(xb + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :],
                         other=0.0)
            for k0 in range(0, K, KCH):  # the next chunk's x is loaded before this one's nonzeros run
                xc = xn
                kk = k0 + KCH + tl.arange(0, KCH)
                xn = tl.load(xb + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :],
                             other=0.0)
                hi = (k0 + KCH) << 8  # codes of this chunk: below (chunk end) << 8
                for g in tl.static_range(G):
                    q = tl.sum(tl.where(gi == g, cur, 0))
                    q1 = tl.sum(tl.where(gi == g, bend, 0))
                    more = q < q1
                    while more:
                        j = q + tl.arange(0, CH)
                        code = tl.load(meta + code_base + j, mask=j < q1, other=hi)
                        jm = code < hi
                        v = tl.load(vals + j, mask=jm, other=0.0)
                        idx = tl.where(jm, (code >> 8) - k0, 0)  # column inside the staged chunk
                        xg = tl.gather(xc, tl.broadcast_to(idx[None, :], (BM, CH)), 1)
                        onehot = tl.where((g * BN + (code & 255))[:, None] == cl[None, :],
                                          v[:, None].to(xg.dtype), tl.zeros((CH, G * BN), dtype=xg.dtype))
                        if IEEE:
                            acc += tl.dot(xg, onehot, input_precision="ieee")
                        else:
                            acc += tl.dot(xg, onehot)
                        n_in = tl.sum(jm.to(tl.int32))
                        q += n_in
                        more = (n_in == CH) & (q < q1)
                    cur = tl.where(gi == g, q, cur)
        if bias_off >= 0:
            acc += tl.load(bias + bias_off + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        m = rmask[:, None] & cmask[None, :]
        yp = y_ptr + start * stride_ym + rows[:, None] * stride_ym + cols[None, :]
        y = tl.load(yp, mask=m, other=0.0)
        tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=m)


def diff_add(x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, tiles: torch.Tensor, n_tiles: int,
             hdr: int, block_n: int, cfg: dict | None = None) -> None:
    """y [n_tok, N] += sparse deltas of the tenants in ``table`` on their tiles' rows; ``hdr``: the
    (layer, site group) entry of each tenant's header; ``block_n``: the packing's (pets/diff).
    ``cfg``: launch config (sweeps); one with ``G`` runs the x-staged kernel (K chunks of ``KCH``)."""
    assert x.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    N, K = y.shape[1], x.shape[1]
    nb = triton.cdiv(N, block_n)
    cfg = dict(cfg or ({"CH": 16, "num_warps": 1} if interpret() else DIFF_CONFIG))
    if "G" in cfg:
        assert cfg["G"] & (cfg["G"] - 1) == 0, cfg  # a power of two: the accumulator is G * BN wide
        cfg.setdefault("KCH", 64)
        grid = (n_tiles, triton.cdiv(nb, cfg["G"]))
        _diff_staged_kernel[grid](x, y, table, tiles, n_tiles, hdr, x.stride(0), y.stride(0), N, K, nb,
                                  BM=TILE_M, BN=block_n, IEEE=x.dtype == torch.float32, **cfg)
    else:
        _diff_kernel[(n_tiles, nb)](x, y, table, tiles, n_tiles, hdr, x.stride(0), y.stride(0), N, BM=TILE_M,
                                    BN=block_n, IEEE=x.dtype == torch.float32, **cfg)


@triton.jit(do_not_specialize=["n_tiles", "hdr", "replace"])
def _masked_kernel(x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr, tiles_ptr, n_tiles, hdr, replace,
                   stride_xm, stride_wn, stride_ym, N, K, RW, IEEE: tl.constexpr,
                   BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    start = tl.load(tiles_ptr + pid)
    n_rows = (tl.load(tiles_ptr + n_tiles + pid) - start).to(tl.int32)  # <= BM
    k = tl.load(tiles_ptr + 2 * n_tiles + pid)
    meta = tl.load(tab_ptr + 2 * k).to(tl.pointer_type(tl.int64))
    words = tl.load(tab_ptr + 2 * k + 1).to(tl.pointer_type(tl.int32))  # the uint8 bits, 4 at a time
    off = tl.load(meta + hdr)  # byte offset of this (layer, site group)'s mask (a multiple of 16), -1: none
    if (off >= 0) | (replace != 0):
        rows = tl.arange(0, BM)  # tile-local: 32-bit offsets from the tile's first row
        rmask = rows < n_rows
        xb = x_ptr + start * stride_xm
        nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        wrow = nmask & ((nn * 0 + off) >= 0)  # rows whose mask words exist (none: all ones); a tensor: interpreter
        mw = words + tl.maximum(off, 0) // 4 + nn * RW  # each row's first word
        jj = tl.arange(0, BLOCK_K // 32)
        bit = (1 << tl.arange(0, 32))[None, None, :]  # little bit order within a word
        acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # branch-free body: an unmasked tenant reads all-ones words
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            xt = tl.load(xb + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + nn[:, None] * stride_wn + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            # rows are padded to whole 128-bit units, so k0 / 32 + jj never leaves the row (BLOCK_K <= 128)
            mword = tl.load(mw[:, None] + (k0 // 32 + jj)[None, :], mask=wrow[:, None], other=-1)
            keep = tl.reshape((mword[:, :, None] & bit) != 0, (BLOCK_N, BLOCK_K))
            w = tl.where(keep, w, tl.zeros_like(w))
            if IEEE:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w))
        acc += tl.load(b_ptr + nn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + start * stride_ym + rows[:, None] * stride_ym + nn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


def mask_config(cfg: dict | None = None) -> dict:
    """The MaskBERT launch config in use: ``cfg`` (sweeps) or the default for this backend."""
    return cfg or (MASK_INTERPRET_CONFIG if interpret() else MASK_CONFIG)


def masked_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, table: torch.Tensor,
                  tiles: torch.Tensor, n_tiles: int, tile_m: int, hdr: int, replace: bool,
                  cfg: dict | None = None) -> None:
    """y[tile rows] = x (W ⊙ M_t)ᵀ + b for each tile's tenant; a tenant without a mask at ``hdr``
    gets x Wᵀ + b when ``replace`` (the shared GEMM skipped its rows), else its rows stay. The
    tiles hold at most ``tile_m`` rows (``sparse.launch_map(group, names, mask_config(cfg)["BM"])``);
    one program covers a tile (tile_m <= BM)."""
    from workers.engine.pets.maskbert import row_bytes
    assert x.stride(-1) == 1 and w.stride(-1) == 1 and y.stride(-1) == 1
    if n_tiles == 0:
        return
    N, K = w.shape
    cfg = mask_config(cfg)
    assert tile_m <= cfg["BM"], (tile_m, cfg)
    assert 32 <= cfg["BLOCK_K"] <= 128 and cfg["BLOCK_K"] % 32 == 0, cfg  # the row padding's guarantee
    grid = (n_tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    _masked_kernel[grid](x, w, b, y, table, tiles, n_tiles, hdr, int(replace), x.stride(0), w.stride(0),
                         y.stride(0), N, K, row_bytes(K) // 4, IEEE=x.dtype == torch.float32, **cfg)
