"""MaskBERT: W' = W * M per tenant, M unpacked from little-endian packed bits (one bit per weight).

The tenant's rows are recomputed as x @ (W * M)^T + b rather than corrected by subtracting
x @ (W * (1 - M))^T: at MaskBERT's few-to-ten percent masked-out weights the sparse correction
is no cheaper than the dense product, and the recompute has no cancellation error. The type
declares the "linear_replace" hook, so the shared GEMM skips its rows: one product per row, not two.

Packed at load time (per tenant, no slot bank) for the batched kernel
(``kernels/triton_sparse.masked_linear``: every MaskBERT tenant of a batch in one launch per layer
and site group): ``bits`` uint8, per (layer, site group) the mask of the group's fused [N, K]
weight (q|k|v rows stacked; a member site the tenant does not mask is all ones), row-major, little
bit order; ``meta`` int64 [layers x site groups]: byte offset of each in ``bits``, -1 = unmasked.
Without Triton (CPU) the same layout runs as one masked addmm per tenant on its own rows.
"""

from __future__ import annotations

import numpy as np
import torch

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.pets import sparse
from workers.engine.pets.common import GROUPS, SITE_GROUP, layers_of, weight_count

DEFAULT_SITES = list(LINEAR_SITES)
TENSORS = ("meta", "bits")  # the kernel's pointer table columns


def _group_bits(t: dict[str, torch.Tensor], i: int, members: list[str], all_sites: list[str],
                dims: BaseDims) -> np.ndarray:
    """The site group's mask over its fused [N, K] weight, packed (little bit order)."""
    parts = []
    for s in members:
        o, k = dims.site_shape(s)
        b = t.get(f"layers.{i}.{s}.mask_bits") if s in all_sites else None
        parts.append((o * k, b.numpy() if b is not None else None))
    if all(n % 8 == 0 for n, _ in parts):  # byte-aligned sites: concatenate the packed bytes
        return np.concatenate([b if b is not None else np.full(n // 8, 255, np.uint8) for n, b in parts])
    bools = [np.unpackbits(b, count=n, bitorder="little") if b is not None else np.ones(n, np.uint8)
             for n, b in parts]
    return np.packbits(np.concatenate(bools), bitorder="little")


def tenant_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
    sites = delta.config.get("sites", DEFAULT_SITES)
    meta = np.full(dims.layers * len(GROUPS), -1, dtype=np.int64)
    chunks, off = [], 0
    for i in layers_of(delta.config, dims):
        for gi, g in enumerate(GROUPS):
            members = [s for s in LINEAR_SITES if SITE_GROUP[s] == g]
            if not any(s in sites for s in members):
                continue
            b = _group_bits(t, i, members, sites, dims)
            meta[i * len(GROUPS) + gi] = off
            chunks.append(b)
            off += b.size
    bits = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return {"meta": torch.from_numpy(meta), "bits": torch.from_numpy(bits)}


def tenant_bytes(cfg: dict, dims: BaseDims, elem_bytes: int, density: float) -> int:
    """Device bytes of one tenant's masks: one bit per weight of each masked site."""
    return (weight_count(cfg, dims, DEFAULT_SITES) + 7) // 8


def unpack_mask(bits: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    m = (bits.unsqueeze(1) >> shifts) & 1  # little bit order: bit k of byte j is element 8j + k
    return m.reshape(-1)[:out_f * in_f].reshape(out_f, in_f).to(torch.bool)


def linear_touches(group, site_group: str) -> bool:
    return True


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer, enc) -> None:
    """Writes the group's rows of y entirely (the shared GEMM skipped them: linear_replace)."""
    hdr = layer * len(GROUPS) + GROUPS.index(site_group)
    w, b = base_layer.params(site_group)
    seg = group.seg
    N, K = w.shape

    def per_tenant(out: torch.Tensor) -> None:
        for res, t0, t1 in group.tenants:
            off = int(res.sparse["meta"][hdr])
            wm = w if off < 0 else w * unpack_mask(res.sparse["bits"][off:off + (N * K + 7) // 8], N, K).to(w.dtype)
            out[t0:t1] = torch.addmm(b, x[t0:t1], wm.t())

    if sparse.use_triton(x):
        from workers.engine.kernels.triton_sparse import masked_linear
        tiles, n_tiles, table = sparse.launch_map(group, TENSORS)

        def kernel(out: torch.Tensor) -> None:
            masked_linear(x[seg.t0:seg.t1], w, b, out[seg.t0:seg.t1], table, tiles, n_tiles, hdr, replace=True)
        if sparse.kernel_wins(enc, "maskbert", site_group, x, len(group.tenants), y, kernel, per_tenant):
            kernel(y)
            return
    per_tenant(y)
