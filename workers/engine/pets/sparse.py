"""What the bank-less PET types (diff-pruning, MaskBERT) share: the Triton launch map of a group.

Their tenants keep their own device tensors (no slot bank), so a batched kernel reaches them
through a per-batch pointer table: row k = the data pointers of tenant k's tensors (its index in
``group.tenants``), next to a tile map of the group's rows (at most TILE_M tokens of one tenant
per tile, local offsets; a kernel may ask for another tile size). Built once per batch, group and
tile size on first use (layer 0), shipped in one host-to-device copy and kept on the group; every
later layer and site group reuses it.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.engine.kernels import interpret, triton_available
from workers.engine.plan import TILE_M


def use_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda or interpret()) and triton_available()


def kernel_wins(enc, pet: str, site_group: str, x: torch.Tensor, n_tenants: int, y: torch.Tensor,
                kernel, per_tenant) -> bool:
    """Batched Triton kernel or the per-tenant torch path for this (type, site group, shape,
    tenant-count class)? Timed once on a scratch copy of y on the first batch of the key and
    kept on the encoder (``Tuned.sparse_kernel``): on the H200 the batched MaskBERT kernel was
    slower than one cuBLAS product per tenant at BERT-base shape, so neither path is assumed.
    Under the Triton interpreter (tests) the kernel is always taken; with autograd on (the
    trainer) never, since only the torch path is differentiable."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return False
    if interpret() or enc is None:
        return True
    key = (pet, site_group, x.shape[1], y.shape[1], x.dtype, max(n_tenants, 1).bit_length())
    choice = enc.tuned.sparse_kernel.get(key)
    if choice is None:
        from workers.engine.kernels import time_us
        scratch = y.clone()
        try:
            kernel(scratch)  # compiles / autotunes outside the timing
            t = {"kernel": time_us(lambda: kernel(scratch)), "per_tenant": time_us(lambda: per_tenant(scratch))}
        except Exception as exc:  # a kernel that does not build here is simply not chosen
            t = {"kernel": float("inf"), "per_tenant": 0.0, "error": repr(exc)[:200]}
        enc.tuned.sparse_kernel_us[str(key)] = t
        choice = enc.tuned.sparse_kernel[key] = t["kernel"] < t["per_tenant"]
    return choice


def tiles_of(starts: np.ndarray, lens: np.ndarray, tile_m: int = TILE_M) -> np.ndarray:
    """[3, n_tiles] (start, end, k): tenant k's rows [starts[k], starts[k] + lens[k]) cut into
    tile_m-row tiles (vectorised)."""
    n_t = -(-lens // tile_m)
    k = np.repeat(np.arange(lens.size, dtype=np.int64), n_t)
    within = np.arange(int(n_t.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_t) - n_t, n_t)
    s = starts[k] + within * tile_m
    return np.stack([s, np.minimum(s + tile_m, starts[k] + lens[k]), k])


def launch_map(group, names: tuple[str, ...], tile_m: int = TILE_M) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(tiles [3, n_tiles] of at most tile_m rows, n_tiles, table [tenants, len(names)] int64 data
    pointers; 0 = absent). One tile map per tile size asked for (MaskBERT's kernel may take
    larger tiles than diff's: W's tile is then read once per 128 rows, not per 64)."""
    maps = group.kernel_map
    if maps is None or tile_m not in maps:
        t0 = group.seg.t0
        ten = group.tenants
        starts = np.fromiter((a - t0 for _, a, _ in ten), dtype=np.int64, count=len(ten))
        lens = np.fromiter((b - a for _, a, b in ten), dtype=np.int64, count=len(ten))
        tiles = tiles_of(starts, lens, tile_m)
        parts = [tiles.reshape(-1)]
        if maps is None:
            parts.append(np.array([[r.sparse[n].data_ptr() if n in r.sparse else 0 for n in names]
                                   for r, _, _ in ten], dtype=np.int64).reshape(-1))
        dev = ten[0][0].sparse[names[0]].device
        host = torch.from_numpy(np.concatenate(parts))
        if dev.type == "cuda":
            host = host.pin_memory()
        flat = host.to(dev, non_blocking=True)  # the pinned host copy is kept with it (async copy)
        n = tiles.shape[1]
        if maps is None:
            maps = group.kernel_map = {"table": flat[3 * n:].view(len(ten), len(names))}
        maps[tile_m] = (flat[:3 * n].view(3, n), n, host)
    tiles, n, _ = maps[tile_m]
    return tiles, n, maps["table"]
