"""IA3: learned per-feature scales on the input or the output of any linear site (PEFT places
them on a module's input when it is listed in ``feedforward_modules``, else on its output).

Bank tensors (per layer, fill 1 = no scaling), each applied by one gathered multiply on the
group's rows, wherever it sits in the layer:

    scale.qkv      [3h]  q | k | v outputs (bias included)            entries q.out, k.out, v.out
    in.attn_out    [h]   attention context = attn_out input          attn_out.in
    scale.attn_out [h]   attention output dense, before residual     attn_out.out
    in.ffn_in      [h]   input of the FFN up-projection (a copy of the residual stream)  ffn_in.in
    scale.ffn_pre  [m]   FFN up-projection output, before the nonlinearity               ffn_in.out
    scale.ffn_act  [m]   intermediate activation = ffn_out input      ffn_out.in (legacy ffn_in)
    scale.ffn_out  [h]   FFN down-projection output, before residual  ffn_out.out
    in.q, in.k, in.v [h] q / k / v inputs: those columns of the fused QKV output are recomputed on
                         the group's rows as (x * l) W^T + b (q, k, v share one input)
    pooler.in / pooler.out [h] (not per layer): the pooler dense's input / pre-tanh output

``scale.qkv`` and ``scale.ffn_act`` are always present (the legacy bank ``ia3``); the others only
when a tenant of the bank uses them (bank key ``ia3:<extras>``), so the PEFT default (k, v out,
attn_out and ffn_out in) costs one extra multiply over the context rows.
"""

from __future__ import annotations

import torch

from schema.layout import POOLER, BaseDims, ia3_entry, ia3_tensor
from workers.engine.bank import BankLayout, SlotSpec
from workers.engine.batch import TenantDelta
from workers.engine.pets import segmented
from workers.engine.pets.common import cells_of, site_col

DEFAULT_SITES = ["k", "v", "ffn_in"]
# (site, mode) -> bank tensor name
_BANK = {("q", "out"): "scale.qkv", ("k", "out"): "scale.qkv", ("v", "out"): "scale.qkv",
         ("attn_out", "in"): "in.attn_out", ("attn_out", "out"): "scale.attn_out",
         ("ffn_in", "in"): "in.ffn_in", ("ffn_in", "out"): "scale.ffn_pre",
         ("ffn_out", "in"): "scale.ffn_act", ("ffn_out", "out"): "scale.ffn_out",
         ("q", "in"): "in.q", ("k", "in"): "in.k", ("v", "in"): "in.v",
         ("pooler", "in"): "pooler.in", ("pooler", "out"): "pooler.out"}
_ALWAYS = ("scale.qkv", "scale.ffn_act")


def _entries(cfg) -> list[str]:
    return list(cfg.get("sites", DEFAULT_SITES))


def _size(name: str, dims: BaseDims) -> int:
    if name == "scale.qkv":
        return 3 * dims.hidden
    return dims.intermediate if name in ("scale.ffn_pre", "scale.ffn_act") else dims.hidden


def bank_layout(cfg: dict, dims: BaseDims) -> BankLayout:
    L = dims.layers
    used = {_BANK[ia3_entry(e)] for e in _entries(cfg)}
    extras = sorted(used - set(_ALWAYS))
    specs = {}
    for name in _ALWAYS + tuple(extras):
        per_layer = not name.startswith("pooler.")
        shape = (L, _size(name, dims)) if per_layer else (dims.hidden,)
        specs[name] = SlotSpec(shape, per_layer=per_layer, fill=1.0)
    return BankLayout("ia3" + (":" + ",".join(extras) if extras else ""), "ia3", specs)


def slot_tensors(delta: TenantDelta, t: dict[str, torch.Tensor], dims: BaseDims, layout: BankLayout):
    out = {n: torch.full(s.shape, s.fill) for n, s in layout.specs.items()}
    entries = _entries(delta.config)
    for i, e in cells_of(delta.config, dims, entries):
        site, mode = ia3_entry(e)
        v = t[ia3_tensor(e, i)]
        name = _BANK[(site, mode)]
        c = site_col(site, dims) if name == "scale.qkv" else 0
        out[name][i, c:c + v.numel()] = v
    for e in entries:
        site, mode = ia3_entry(e)
        if site == POOLER:
            out[_BANK[(site, mode)]][:] = t[ia3_tensor(e, None)]
    return out


def scales(group, name: str) -> bool:
    """Whether the group's bank holds the scale ``name`` (some tenant of the bank uses it)."""
    return group.bank.get(name) is not None


def scale(group, layer: int, name: str, y: torch.Tensor) -> None:
    """y[group rows] *= bank[name][slot, layer]; name: a per-layer bank tensor (see module doc).
    Legacy short names "qkv" / "ffn_act" mean "scale.qkv" / "scale.ffn_act"."""
    if "." not in name:
        name = f"scale.{name}"
    scale = group.bank.get(name)
    if scale is None:
        return
    seg = group.seg
    scale = scale[:, layer]
    if segmented.use_triton(y, seg):  # gathered in the kernel, no [rows, cols] scale tensor
        from workers.engine.kernels.triton_norm import rows_affine_
        rows_affine_(y, seg.t0, seg.t1, seg.tok_slots, scale=scale)
        return
    y[seg.t0:seg.t1] *= scale.index_select(0, seg.tok_slots)


def qkv_input(group, layer: int, x: torch.Tensor, qkv: torch.Tensor, lw, enc) -> None:
    """Input scaling of q / k / v: recompute those columns of the group's rows as (x * l) W^T + b."""
    seg = group.seg
    for s in ("q", "k", "v"):
        scale = group.bank.get(f"in.{s}")
        if scale is None:
            continue
        w, b = lw.site_weight(s)
        xs = x[seg.t0:seg.t1] * scale[:, layer].index_select(0, seg.tok_slots)
        c = site_col(s, enc.dims)
        qkv[seg.t0:seg.t1, c:c + w.shape[0]] = torch.addmm(b, xs, w.t())
