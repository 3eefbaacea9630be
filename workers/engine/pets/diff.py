"""Diff-pruning: W' = W + dense(dW) per tenant, dW given as flat row-major (out, in) indices +
values, plus optional bias deltas; y[:, o] += sum over nonzeros x[:, i] * v (fp32 accumulate).

Packed at load time (per tenant, no slot bank) for the batched kernel
(``kernels/triton_sparse.diff_add``: every diff tenant of a batch in one launch per layer and
site group):

* ``meta`` int32: [code_base, header (layer, site group) -> (block pointer offset | -1, bias
  offset | -1), block pointers, codes]. Per (layer, site group) the nonzeros of its member sites
  (q|k|v columns side by side) are sorted by output block of BLOCK_N columns, then by input
  column; the block's pointers index ``val`` / the codes (code = in << 8 | column in the block).
* ``val``: the values in that order (a differentiable gather of ``delta_value``: the trainer
  retrains them through this path); ``bias``: the bias deltas, site group rows side by side.

Without Triton (CPU) the same layout runs as an index_add per tenant on its own rows.
"""

from __future__ import annotations

import torch

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError
from workers.engine.pets import sparse
from workers.engine.pets.common import GROUPS, SITE_GROUP, group_in, group_out, layers_of, site_col, weight_count

DEFAULT_SITES = list(LINEAR_SITES)
BLOCK_N = 32  # output columns per packed block (<= 256: the column inside a block is a code's low byte)
TENSORS = ("meta", "val", "bias")  # the kernel's pointer table columns


def _header_len(dims: BaseDims) -> int:
    return 1 + 2 * dims.layers * len(GROUPS)


def tenant_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
    sites = delta.config.get("sites", DEFAULT_SITES)
    head = [-1] * _header_len(dims)
    blks, codes, vals, biases = [], [], [], []
    pos, nnz, nbias = _header_len(dims), 0, 0
    for i in layers_of(delta.config, dims):
        for gi, g in enumerate(GROUPS):
            ms = [s for s in sites if SITE_GROUP[s] == g]
            if not ms:
                continue
            N, K = group_out(g, dims), group_in(g, dims)
            cols, ins, vs = [], [], []
            bias = torch.zeros(N)
            has_bias = False
            for s in ms:
                o_f, i_f = dims.site_shape(s)
                idx, val = t[f"layers.{i}.{s}.delta_index"], t[f"layers.{i}.{s}.delta_value"]
                if idx.numel() != val.numel():
                    raise AdapterLoadError(f"tenant {delta.tenant_id}: layers.{i}.{s} index/value lengths differ")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= o_f * i_f):
                    raise AdapterLoadError(f"tenant {delta.tenant_id}: layers.{i}.{s}.delta_index out of range")
                cols.append(idx // i_f + site_col(s, dims))
                ins.append(idx % i_f)
                vs.append(val)
                bname = f"layers.{i}.{s}.bias"
                if bname in t:
                    c = site_col(s, dims)
                    bias[c:c + o_f] = t[bname]
                    has_bias = True
            hdr = 1 + 2 * (i * len(GROUPS) + gi)
            col, inn = torch.cat(cols), torch.cat(ins)
            if col.numel():
                blk = col // BLOCK_N
                order = torch.argsort((blk * K + inn) * BLOCK_N + col % BLOCK_N)
                nb = -(-N // BLOCK_N)
                ptr = torch.zeros(nb + 1, dtype=torch.int64)
                ptr[1:] = torch.cumsum(torch.bincount(blk, minlength=nb), 0)
                head[hdr] = pos
                blks.append(ptr + nnz)
                pos += nb + 1
                codes.append(((inn << 8) | (col % BLOCK_N))[order])
                vals.append(torch.cat(vs)[order])
                nnz += col.numel()
            if has_bias:
                head[hdr + 1] = nbias
                biases.append(bias)
                nbias += N
    head[0] = pos  # code_base: codes follow the block pointers
    meta = torch.cat([torch.tensor(head, dtype=torch.int64)] + blks + codes).to(torch.int32)
    return {"meta": meta, "val": torch.cat(vals) if vals else torch.zeros(0),
            "bias": torch.cat(biases) if biases else torch.zeros(0)}


def tenant_bytes(cfg: dict, dims: BaseDims, elem_bytes: int, density: float) -> int:
    """Device bytes of one tenant at ``density`` nonzeros: int32 code + value each, block pointers."""
    blocks = sum(-(-group_out(g, dims) // BLOCK_N) + 1 for g in GROUPS) * len(layers_of(cfg, dims))
    return int(weight_count(cfg, dims, DEFAULT_SITES) * density) * (4 + elem_bytes) + 4 * (blocks + _header_len(dims))


def linear_touches(group, site_group: str) -> bool:
    return True


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer=None, enc=None) -> None:
    hdr = layer * len(GROUPS) + GROUPS.index(site_group)
    seg = group.seg
    if sparse.use_triton(x):
        from workers.engine.kernels.triton_sparse import diff_add
        tiles, n_tiles, table = sparse.launch_map(group, TENSORS)

        def kernel(out: torch.Tensor) -> None:
            diff_add(x[seg.t0:seg.t1], out[seg.t0:seg.t1], table, tiles, n_tiles, hdr, BLOCK_N)
        if sparse.kernel_wins(enc, "diff", site_group, x, len(group.tenants), y, kernel,
                              lambda out: _per_tenant(group, hdr, x, out)):
            kernel(y)
            return
    _per_tenant(group, hdr, x, y)


def _per_tenant(group, hdr: int, x: torch.Tensor, y: torch.Tensor) -> None:
    N = y.shape[1]
    nb = -(-N // BLOCK_N)
    for res, t0, t1 in group.tenants:
        d = res.sparse
        meta = d["meta"]
        bo, bi = meta[1 + 2 * hdr:3 + 2 * hdr].tolist()
        if bo < 0 and bi < 0:
            continue
        acc = torch.zeros(t1 - t0, N, device=y.device, dtype=torch.float32)
        if bo >= 0:
            ptr = meta[bo:bo + nb + 1].long()
            j0, j1, cb = int(ptr[0]), int(ptr[-1]), int(meta[0])
            code = meta[cb + j0:cb + j1].long()
            col = torch.repeat_interleave(torch.arange(nb, device=y.device) * BLOCK_N, ptr.diff()) + (code & 255)
            contrib = x[t0:t1].index_select(1, code >> 8).float() * d["val"][j0:j1].float()
            acc.index_add_(1, col, contrib)
        if bi >= 0:
            acc += d["bias"][bi:bi + N].float()
        y[t0:t1] += acc.to(y.dtype)
