"""Diff-pruning and MaskBERT: per-tenant ops on the tenant's own contiguous rows.

Diff-pruning: W' = W + dense(dW) with dW given as flat row-major (out, in) indices + values, plus
optional bias deltas. Computed sparsely: y[:, o] += sum over nonzeros x[:, i] * v (fp32 accumulate).
MaskBERT: W' = W * M, M unpacked from little-endian packed bits. The masked rows are recomputed
as x @ (W * M)^T + b instead of subtracting x @ (W * (1 - M))^T: same cost, no cancellation error.
"""

from __future__ import annotations

import torch

from schema.layout import BaseDims
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError
from workers.engine.pets.common import GROUPS, SITE_GROUP, group_out, layers_of, site_col

DEFAULT_SITES = ["q", "k", "v", "attn_out", "ffn_in", "ffn_out"]


def diff_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
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


def mask_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims) -> dict[str, torch.Tensor]:
    sites = delta.config.get("sites", DEFAULT_SITES)
    return {f"{i}.{s}.bits": t[f"layers.{i}.{s}.mask_bits"]
            for i in layers_of(delta.config, dims) for s in sites}


def apply_diff(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor) -> None:
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


def unpack_mask(bits: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    m = (bits.unsqueeze(1) >> shifts) & 1  # little bit order: bit k of byte j is element 8j + k
    return m.reshape(-1)[:out_f * in_f].reshape(out_f, in_f).to(torch.bool)


def apply_mask(group, layer: int, site_group: str, x: torch.Tensor, y: torch.Tensor, base_layer, dims) -> None:
    for res, t0, t1 in group.tenants:
        d = res.sparse
        for s in ("q", "k", "v") if site_group == "qkv" else (site_group,):
            bits = d.get(f"{layer}.{s}.bits")
            if bits is None:
                continue
            w, b = base_layer.site_weight(s)
            wm = w * unpack_mask(bits, *w.shape).to(w.dtype)
            c = site_col(s, dims)
            y[t0:t1, c:c + w.shape[0]] = torch.addmm(b, x[t0:t1], wm.t())
