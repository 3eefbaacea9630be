"""MaskBERT: W' = W * M per tenant, M unpacked from little-endian packed bits (one bit per weight).

The tenant's rows are recomputed as x @ (W * M)^T + b rather than corrected by subtracting
x @ (W * (1 - M))^T: at MaskBERT's few-to-ten percent masked-out weights the sparse correction
is no cheaper than the dense product, and the recompute has no cancellation error. The type
declares the "linear_replace" hook, so the shared GEMM skips its rows: one product per row, not two.

Packed at load time (per tenant, no slot bank) for the batched kernel
(``kernels/triton_sparse.masked_linear``: every MaskBERT tenant of a batch in one launch per layer
and site group): ``bits`` uint8, per (layer, site group) the mask of the group's fused [N, K]
weight (q|k|v rows stacked; a member site the tenant does not mask is all ones), little bit order,
each weight row padded to ``row_bytes(K)`` (a multiple of 16 bytes: the kernel reads a row's bits
for a K block as whole aligned int32 words, one cp.async each, never past the row; BERT's K is a
multiple of 128, so no padding there and the payload's bytes are copied as they are); ``meta``
int64 [layers x site groups]: byte offset of each in ``bits`` (a multiple of 16), -1 = unmasked.
The payload's ``mask_bits`` (per site, row-major without padding) is unchanged: this is load time.
Without Triton (CPU) the same layout runs as one masked addmm per tenant on its own rows.
"""

from __future__ import annotations

import numpy as np
import torch

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.pets import sparse
from workers.engine.pets.common import GROUPS, SITE_GROUP, group_in, group_out, layers_of

DEFAULT_SITES = list(LINEAR_SITES)
TENSORS = ("meta", "bits")  # the kernel's pointer table columns


def row_bytes(k: int) -> int:
    """Bytes of one packed weight row of K bits: whole 128-bit units."""
    return 16 * -(-k // 128)


def _group_bits(t: dict[str, torch.Tensor], i: int, members: list[str], all_sites: list[str],
                dims: BaseDims) -> np.ndarray:
    """The site group's mask over its fused [N, K] weight, rows padded to ``row_bytes(K)``."""
    parts = []
    for s in members:
        o, k = dims.site_shape(s)
        b = t.get(f"layers.{i}.{s}.mask_bits") if s in all_sites else None
        parts.append((o * k, b.numpy() if b is not None else None))
    k = dims.site_shape(members[0])[1]
    rb = row_bytes(k)
    if rb * 8 == k:  # rows already whole units: the packed site bytes are the layout
        return np.concatenate([b if b is not None else np.full(n // 8, 255, np.uint8) for n, b in parts])
    rows = np.concatenate([(np.unpackbits(b, count=n, bitorder="little") if b is not None else np.ones(n, np.uint8))
                           .reshape(-1, k) for n, b in parts])
    padded = np.ones((rows.shape[0], rb * 8), np.uint8)
    padded[:, :k] = rows
    return np.packbits(padded, axis=1, bitorder="little").reshape(-1)


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
    """Device bytes of one tenant's masks: one bit per weight of each masked site group (rows padded)."""
    sites = cfg.get("sites", DEFAULT_SITES)
    groups = {SITE_GROUP[s] for s in sites}
    per_layer = sum(group_out(g, dims) * row_bytes(group_in(g, dims)) for g in groups)
    return per_layer * len(layers_of(cfg, dims))


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
    rb = row_bytes(K)

    def per_tenant(out: torch.Tensor) -> None:
        for res, t0, t1 in group.tenants:
            off = int(res.sparse["meta"][hdr])
            wm = w if off < 0 else w * unpack_mask(res.sparse["bits"][off:off + N * rb], N, rb * 8)[:, :K].to(w.dtype)
            out[t0:t1] = torch.addmm(b, x[t0:t1], wm.t())

    if sparse.use_triton(x):
        from workers.engine.kernels.triton_sparse import mask_config, masked_linear
        bm = mask_config()["BM"]
        tiles, n_tiles, table = sparse.launch_map(group, TENSORS, bm)

        def kernel(out: torch.Tensor) -> None:
            masked_linear(x[seg.t0:seg.t1], w, b, out[seg.t0:seg.t1], table, tiles, n_tiles, bm, hdr, replace=True)
        if sparse.kernel_wins(enc, "maskbert", site_group, x, len(group.tenants), y, kernel, per_tenant):
            kernel(y)
            return
    per_tenant(y)
