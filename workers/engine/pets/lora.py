"""LoRA: y += (alpha/r) * (x A^T) B^T on the tenant's rows, for any subset of the linear sites.

Bank key: rank bucket + site set (ranks are bucketed, never padded to the batch max). Sites that
share an input (q, k, v) share one shrink: their A matrices are stacked along the rank axis.
The scale alpha/r is folded into B at conversion time.
"""

from __future__ import annotations

import torch

from schema.layout import LINEAR_SITES, POOLER, BaseDims, lora_scale
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import segmented
from workers.engine.pets.common import GROUPS, SITE_GROUP, cells_of, group_in, next_bucket, site_col

RANK_BUCKETS = (8, 16, 32, 64, 128, 256)


def _sites(cfg) -> list[str]:
    chosen = cfg.get("sites", ["q", "v"])
    return [s for s in LINEAR_SITES + (POOLER,) if s in chosen]


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    rb = next_bucket(int(cfg["r"]), RANK_BUCKETS)
    sites = _sites(cfg)
    specs, members = {}, {}
    L = dims.layers
    for g in GROUPS:
        ms = [s for s in sites if SITE_GROUP.get(s) == g]
        if not ms:
            continue
        out_f = dims.site_shape(ms[0])[0]
        specs[f"A.{g}"] = SlotSpec((L, len(ms) * rb, group_in(g, dims)))
        specs[f"B.{g}"] = SlotSpec((L, len(ms), out_f, rb))
        members[g] = [site_col(s, dims) for s in ms]
    if POOLER in sites:  # the pooler dense (one per model, not per layer): applied in heads.pool_hidden
        specs["A.pooler"] = SlotSpec((rb, dims.hidden), per_layer=False)
        specs["B.pooler"] = SlotSpec((dims.hidden, rb), per_layer=False)
    return BankLayout(f"lora:r{rb}:{','.join(sites)}", "lora", specs, {"rank": rb, "cols": members})


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    cfg, rb = delta.config, layout.extra["rank"]
    r, scale = int(cfg["r"]), lora_scale(cfg)
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    sites = _sites(cfg)
    cells = set(cells_of(cfg, dims, sites))
    for g in GROUPS:
        ms = [s for s in sites if SITE_GROUP.get(s) == g]
        for m, s in enumerate(ms):
            for i in range(dims.layers):
                if (i, s) in cells:  # cells a tenant skips stay zero: no delta
                    out[f"A.{g}"][i, m * rb:m * rb + r] = t[f"layers.{i}.{s}.lora_A"]
                    out[f"B.{g}"][i, m, :, :r] = t[f"layers.{i}.{s}.lora_B"] * scale
    if POOLER in sites:
        out["A.pooler"][:r] = t["pooler.lora_A"]
        out["B.pooler"][:, :r] = t["pooler.lora_B"] * scale
    return out


def linear_touches(group, site_group: str) -> bool:
    return group.bank.get(f"A.{site_group}") is not None


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer, enc) -> None:
    """x: full-batch input of the site group, y: its output; touches only the group's rows.
    enc.options.lora_fused picks the fused or separate Triton kernels (timed once: enc.tuned)."""
    bank = group.bank
    A = bank.get(f"A.{site_group}")
    if A is None:
        return
    seg = group.seg
    xs, ys = x[seg.t0:seg.t1], y[seg.t0:seg.t1]
    A, B, cols = A[:, layer], bank.get(f"B.{site_group}")[:, layer], bank.extra["cols"][site_group]
    if _use_fused(enc, xs, A, B, seg, ys, cols):
        from workers.engine.kernels.triton_lora import sgmv_lora_fused
        sgmv_lora_fused(xs, A, B, seg.tiles, seg.n_tiles, ys, cols)
        return
    xa = segmented.shrink(xs, A, seg)
    segmented.expand_add(xa, B, seg, ys, cols)


def gemm_ok(group, site_group: str, x: torch.Tensor) -> bool:
    """Can the GEMM with this group's delta in its epilogue produce the site group's output?"""
    A = group.bank.get(f"A.{site_group}")
    if A is None or not segmented.use_triton(x, group.seg) or group.seg.n_tiles == 0:
        return False
    if x.shape[0] * x.shape[1] * 4 >= 2 ** 31:  # the kernel's int32 offsets (outputs up to 4x the input width)
        return False
    B = group.bank.get(f"B.{site_group}")
    return A.shape[-2] == B.shape[-3] * B.shape[-1]  # [slots, layers, R, K] vs [slots, layers, members, N, r]


def linear_gemm(group, layer: int, site_group: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y = x wᵀ + b for every row, the group's LoRA delta added in the GEMM's epilogue."""
    from workers.engine.kernels.triton_lora import cols_tensor, sgmv_shrink
    from workers.engine.kernels.triton_lora_gemm import gemm_tiles, lora_gemm
    from workers.engine.plan import TILE_M
    bank, seg = group.bank, group.seg
    T = x.shape[0]
    if group.kernel_map is None or group.kernel_map[0] != T:  # once per plan (every layer reuses it)
        group.kernel_map = (T, gemm_tiles(seg.tiles, seg.n_tiles, seg.t0, seg.t1, T, TILE_M))
    cols = cols_tensor(bank.extra["cols"][site_group], x.device)
    xa = sgmv_shrink(x[seg.t0:seg.t1], bank.get(f"A.{site_group}")[:, layer], seg.tiles, seg.n_tiles)
    return lora_gemm(x, w, b, xa, bank.get(f"B.{site_group}")[:, layer], group.kernel_map[1], seg.t0, cols, TILE_M)


def _use_fused(enc, x, A, B, seg, y, cols) -> bool:
    mode = enc.options.lora_fused
    if mode == "0" or not segmented.use_triton(x, seg) or seg.n_tiles == 0:
        return False
    from workers.engine.kernels import interpret
    from workers.engine.kernels.triton_lora import fused_ok
    if not fused_ok(A, B):
        return False
    if mode == "1" or interpret():
        return True
    key = (x.shape[1], A.shape[1], B.shape[2], B.shape[1], x.dtype, max(seg.n_tiles, 1).bit_length())
    choice = enc.tuned.lora_fused.get(key)
    if choice is None:
        t = _measure(x, A, B, seg, y, cols)
        enc.tuned.lora_fused_us[str(key)] = t
        choice = enc.tuned.lora_fused[key] = t["fused"] < t["separate"]
    return choice


def _measure(x, A, B, seg, y, cols) -> dict:
    """Time both Triton paths once on a scratch copy of y (first batch of this shape): us per call."""
    from workers.engine.kernels import time_us
    from workers.engine.kernels.triton_lora import sgmv_lora_fused
    scratch = y.clone()

    def separate():
        segmented.expand_add(segmented.shrink(x, A, seg), B, seg, scratch, cols)

    def fused():
        sgmv_lora_fused(x, A, B, seg.tiles, seg.n_tiles, scratch, cols)
    try:
        fused()  # tunes the fused kernel's config for this shape (on its own scratch copy)
        separate()  # autotunes the separate kernels
        t = {"separate": time_us(separate), "fused": time_us(fused)}
    except Exception as exc:  # a kernel that does not build here is simply not chosen
        t = {"fused": float("inf"), "separate": 0.0, "error": repr(exc)[:200]}
    return t


def can_init(groups, site_group: str) -> bool:
    """Whether these groups can write bias + delta before the base GEMM accumulates (Triton path)."""
    for g in groups:
        seg = g.seg
        if seg.tiles is None or not segmented.triton_ok():
            return False
        B = g.bank.get(f"B.{site_group}")
        if any(c % B.shape[2] for c in g.bank.extra["cols"][site_group]):
            return False
    return True


def linear_init(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_bias: torch.Tensor) -> None:
    """y[group rows] = base_bias + LoRA delta (every column written); the base GEMM adds x W^T after."""
    from workers.engine.kernels.triton_lora import sgmv_expand_init
    bank, seg = group.bank, group.seg
    xa = segmented.shrink(x[seg.t0:seg.t1], bank.get(f"A.{site_group}")[:, layer], seg)
    sgmv_expand_init(xa, bank.get(f"B.{site_group}")[:, layer], seg.tiles, seg.n_tiles, y[seg.t0:seg.t1],
                     bank.extra["cols"][site_group], base_bias)
