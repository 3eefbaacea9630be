"""The shared GEMM with one LoRA group's delta in its epilogue (issue 14 item 1), in Triton.

y = x Wᵀ + b + (xa_t B_tᵀ on each LoRA member's columns), for every row of the batch: the rows are
walked in tiles of at most TILE_M tokens of one tenant (the LoRA group's own tiles, slot >= 0)
or of no LoRA tenant (slot -1), so a tile's epilogue adds ONE tenant's rank-r product (a
tensor-core dot of [rows, r] by [r, columns]) to the accumulator before the single store. What
this saves against cuBLAS + a separate LoRA pass is the read-modify-write of the q|v output
(2 x 65,536 x 1,536 x 2 B per layer at 512 x 128) — if the GEMM itself keeps up with cuBLAS,
which ``pets/lora.py`` measures once per shape before choosing it.

``xa`` (x A_tᵀ of the group's rows, [t1 - t0, members * r]) comes from the segmented shrink.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.engine.kernels import interpret

# (BLOCK_N, BLOCK_K, warps, stages); BLOCK_M is the tile size. On CUDA the first call of a shape
# times every config (the output is fresh, so trying them has no side effect) and keeps the best.
SWEEP = [(128, 64, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 4, 3), (256, 32, 8, 4),
         (128, 64, 8, 4), (64, 64, 4, 4)]
best_config: dict = {}  # shape key -> config
sweep_us: dict = {}  # str(shape key) -> {str(config): us} (reports)


@triton.jit(do_not_specialize=["n_tiles", "t0"])
def _lora_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, xa_ptr, B_ptr, tiles_ptr, cols_ptr, n_tiles, t0, N, K, NM, RB,
                      stride_xm, stride_wn, stride_ym, stride_xam, stride_bs, stride_bm, stride_bn,
                      MEMBERS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    n_nb = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_nb  # consecutive programs share the x tile (W stays in L2)
    pid_n = pid % n_nb
    start = tl.load(tiles_ptr + pid_m)
    end = tl.load(tiles_ptr + n_tiles + pid_m)
    slot = tl.load(tiles_ptr + 2 * n_tiles + pid_m)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = offs_m < end
    cmask = offs_n < N
    # the main loop as in Triton's matmul tutorial: affine offsets, row / column masks only
    a_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + offs_k[:, None] + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] view of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=rmask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=cmask[None, :] & (offs_k[:, None] < K - k0), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc += tl.load(b_ptr + offs_n, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if slot >= 0:
        rr = tl.arange(0, BLOCK_R)
        n0 = pid_n * BLOCK_N
        for m in tl.static_range(MEMBERS):
            c0 = tl.load(cols_ptr + m)
            if (n0 < c0 + NM) & (n0 + BLOCK_N > c0):  # this column block meets member m's columns
                lc = offs_n - c0
                inm = (lc >= 0) & (lc < NM) & cmask
                xa = tl.load(xa_ptr + (offs_m - t0)[:, None] * stride_xam + m * RB + rr[None, :],
                             mask=rmask[:, None] & (rr[None, :] < RB), other=0.0)
                bt = tl.load(B_ptr + slot.to(tl.int64) * stride_bs + m * stride_bm + lc[None, :] * stride_bn
                             + rr[:, None], mask=inm[None, :] & (rr[:, None] < RB), other=0.0)
                if IEEE:
                    acc = tl.dot(xa, bt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xa, bt, acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def gemm_tiles(group_tiles: torch.Tensor, n_group_tiles: int, t0: int, t1: int, T: int, tile: int) -> torch.Tensor:
    """[3, n] (start, end, slot) tiles covering rows [0, T): the group's own tiles (local starts
    shifted by t0) and tiles of at most ``tile`` rows with slot -1 before and after the group."""
    dev = group_tiles.device
    parts = []

    def plain(a, b):
        s = torch.arange(a, b, tile, device=dev, dtype=torch.int32)
        return torch.stack([s, torch.clamp(s + tile, max=b), torch.full_like(s, -1)])
    if t0 > 0:
        parts.append(plain(0, t0))
    g = group_tiles.view(3, -1)[:, :n_group_tiles].to(torch.int32)
    parts.append(torch.stack([g[0] + t0, g[1] + t0, g[2]]))
    if t1 < T:
        parts.append(plain(t1, T))
    return torch.cat(parts, dim=1).contiguous()


def lora_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, B: torch.Tensor,
              tiles: torch.Tensor, t0: int, cols: torch.Tensor, tile: int, config: tuple | None = None) -> torch.Tensor:
    """y [T, N] = x wᵀ + b + per-tile LoRA delta. x [T, K], w [N, K], xa [group rows, members * r],
    B [slots, members, NM, r] (last dims contiguous), tiles from ``gemm_tiles``, cols: [members]
    int32 first output column of each member."""
    assert x.stride(-1) == 1 and w.stride(-1) == 1 and B.stride(-1) == 1 and xa.stride(-1) == 1
    T, K = x.shape
    N = w.shape[0]
    members, NM, RB = B.shape[1], B.shape[2], B.shape[3]
    y = torch.empty(T, N, device=x.device, dtype=x.dtype)
    n_tiles = tiles.shape[1]
    if n_tiles == 0:
        return y
    br = max(16, triton.next_power_of_2(RB))

    def launch(cfg):
        bn, bk, warps, stages = cfg
        grid = (n_tiles * triton.cdiv(N, bn),)
        _lora_gemm_kernel[grid](x, w, b, y, xa, B, tiles, cols, n_tiles, t0, N, K, NM, RB,
                                x.stride(0), w.stride(0), y.stride(0), xa.stride(0), B.stride(0), B.stride(1),
                                B.stride(2), MEMBERS=members, EVEN_K=K % bk == 0, IEEE=x.dtype == torch.float32,
                                BLOCK_M=tile, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=stages)
    if config is None and interpret():
        config = (32, 16, 1, 1)
    if config is None:
        key = (N, K, members, RB, x.dtype, n_tiles.bit_length())
        config = best_config.get(key)
        if config is None:
            from workers.engine.kernels import time_us
            times = {}
            for cfg in SWEEP:
                try:
                    times[cfg] = time_us(lambda: launch(cfg), reps=5)
                except Exception:  # e.g. out of shared memory for this config here
                    continue
            sweep_us[str(key)] = {str(c): round(t, 1) for c, t in times.items()}
            config = best_config[key] = min(times, key=times.get)
    launch(config)
    return y
