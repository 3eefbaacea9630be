"""Diff-pruning: W' = W + dense(dW) per tenant, dW given as flat row-major (out, in) indices +
values, plus optional bias deltas. Computed sparsely: y[:, o] += sum over nonzeros x[:, i] * v
(fp32 accumulate), per tenant on its own contiguous rows (no slot bank).
"""

from __future__ import annotations

import torch

from schema.layout import LINEAR_SITES, BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError
from workers.engine.pets.common import GROUPS, SITE_GROUP, group_out, layers_of, site_col, weight_count

DEFAULT_SITES = list(LINEAR_SITES)


def tenant_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
    """Per (layer, group): col index, in index, value (nonzeros of all member sites), bias delta."""
    out: dict[str, torch.Tensor] = {}
    sites = delta.config.get("sites", DEFAULT_SITES)
    for i in layers_of(delta.config, dims):
        for g in GROUPS:
            ms = [s for s in sites if SITE_GROUP[s] == g]
            if not ms:
                continue
            cols, ins, vals = [], [], []
            bias = torch.zeros(group_out(g, dims))
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
                vals.append(val)
                bname = f"layers.{i}.{s}.bias"
                if bname in t:
                    c = site_col(s, dims)
                    bias[c:c + o_f] = t[bname]
                    has_bias = True
            out[f"{i}.{g}.col"] = torch.cat(cols)
            out[f"{i}.{g}.in"] = torch.cat(ins)
            out[f"{i}.{g}.val"] = torch.cat(vals)
            if has_bias:
                out[f"{i}.{g}.bias"] = bias
    return out


def tenant_bytes(cfg: dict, dims: BaseDims, elem_bytes: int, density: float) -> int:
    """Device bytes of one tenant at ``density`` nonzeros (int64 col + int64 in + value each)."""
    return int(weight_count(cfg, dims, DEFAULT_SITES) * density) * (8 + 8 + elem_bytes)


def linear_touches(group, site_group: str) -> bool:
    return True


def linear(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer=None, enc=None) -> None:
    for res, t0, t1 in group.tenants:
        d = res.sparse
        col = d.get(f"{layer}.{site_group}.col")
        if col is None:
            continue
        xs = x[t0:t1]
        contrib = xs.index_select(1, d[f"{layer}.{site_group}.in"]).float() * d[f"{layer}.{site_group}.val"]
        acc = torch.zeros(t1 - t0, y.shape[1], device=y.device, dtype=torch.float32)
        acc.index_add_(1, col, contrib)
        bias = d.get(f"{layer}.{site_group}.bias")
        if bias is not None:
            acc += bias
        y[t0:t1] += acc.to(y.dtype)
