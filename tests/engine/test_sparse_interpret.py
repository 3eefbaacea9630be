"""Diff-pruning and MaskBERT batched (issue 14): many tenants of a bank-less group in one launch
per (layer, site group). The Triton kernels run on CPU through Triton's interpreter
(TRITON_INTERPRET=1, fp32) and, like the torch path, must equal an independent dense reference
built from the raw delta tensors (W + dense(ΔW) + bias deltas; W ⊙ M from numpy-unpacked bits)."""

from __future__ import annotations

import os
import subprocess
import sys

import triton  # noqa: F401  - the interpreter needs it

CHILD = r'''
import os, types
import numpy as np, torch
torch.set_num_threads(1)
from schema.layout import BaseDims
from workers.engine.pets import diff, maskbert
from workers.engine.pets.common import GROUPS, checked_tensors, group_in, group_out, site_col, SITE_GROUP
from workers.engine.plan import PetGroup, Segments
from tests.engine.conftest import random_delta

from workers.engine.kernels.triton_sparse import MASK_INTERPRET_CONFIG, diff_add, masked_linear
from workers.engine.pets import sparse

rng = np.random.default_rng(3)
worst = {}

def dense_ref(pet, delta, i, g, x, w, b):
    """The site group's output for one tenant, from the raw delta tensors only."""
    cfg, t = delta.config, delta.tensors
    layers = cfg.get("layers", list(range(dims.layers)))
    w, b = w.clone(), b.clone()
    for s in cfg["sites"]:
        if SITE_GROUP[s] != g or i not in layers:
            continue
        o, n = dims.site_shape(s)
        c = site_col(s, dims)
        if pet == "diff":
            d = torch.zeros(o * n)
            d.index_add_(0, t[f"layers.{i}.{s}.delta_index"], t[f"layers.{i}.{s}.delta_value"].float())
            w[c:c + o] += d.view(o, n)
            if f"layers.{i}.{s}.bias" in t:
                b[c:c + o] += t[f"layers.{i}.{s}.bias"]
        else:
            m = np.unpackbits(t[f"layers.{i}.{s}.mask_bits"].numpy(), count=o * n, bitorder="little")
            w[c:c + o] *= torch.from_numpy(m.reshape(o, n)).float()
    return x @ w.t() + b

# hidden, intermediate, layers, heads. (32, 64): q|k|v 96 columns; (36, 72): K and N multiples of
# neither the kernels' blocks nor 8 (mask rows not byte aligned); (128, 256): mask rows exactly 16
# bytes (the payload's bytes copied as they are), K a multiple of the block
for dims in (BaseDims(32, 64, 2, 2), BaseDims(36, 72, 2, 2), BaseDims(128, 256, 1, 2)):
  for pet, mod in (("diff", diff), ("maskbert", maskbert)):
    deltas = [random_delta(f"t{k}", pet, dims, rng) for k in range(7)]
    d0 = deltas[0]  # one tenant touches only q: no mask / delta at the other site groups
    d0.config["sites"] = ["q"]
    d0.config.pop("layers", None)
    d0.tensors.update({n: v for n, v in random_delta("q", pet, dims, rng).tensors.items() if ".q." in n})
    for n in [n for n in d0.tensors if n.startswith("layers.") and ".q." not in n]:
        del d0.tensors[n]
    residents = [types.SimpleNamespace(sparse=mod.tenant_tensors(d, checked_tensors(d, dims), dims)) for d in deltas]
    lens = [1, 64, 65, 130, 7, 63, 40]  # tiles: exact, split, several per tenant, tiny
    t0 = 5  # the group does not start at row 0
    spans, t = [], t0
    for n in lens:
        spans.append((t, t + n)); t += n
    T = t + 3
    for g in GROUPS:
        N, K = group_out(g, dims), group_in(g, dims)
        w, b = torch.randn(N, K) * 0.2, torch.randn(N) * 0.1
        lw = types.SimpleNamespace(params=lambda site, w=w, b=b: (w, b))
        x = torch.randn(T, K)
        for i in range(dims.layers):
            ref = torch.full((T, N), 7.0)
            for d, (a, c) in zip(deltas, spans):
                ref[a:c] = dense_ref(pet, d, i, g, x[a:c], w, b)
            for path in ("1", "0"):  # Triton interpreter, torch path
                os.environ["TRITON_INTERPRET"] = path
                group = PetGroup(pet, None, Segments(t0, spans[-1][1], max(lens)),
                                 [(r, a, c) for r, (a, c) in zip(residents, spans)])
                y = torch.full((T, N), 7.0)
                if pet == "diff":  # adds to the shared GEMM's output
                    y[t0:spans[-1][1]] = x[t0:spans[-1][1]] @ w.t() + b
                mod.linear(group, i, g, x, y, lw, None)
                outs = [(path, y)]
                if pet == "diff" and path == "1":  # the x-staged kernel, 1 and 4 packed blocks per program (past N too)
                    tiles, n_tiles, table = sparse.launch_map(group, mod.TENSORS)
                    for cfg in ({"G": 1, "KCH": 32, "CH": 4, "num_warps": 1}, {"G": 4, "CH": 32, "num_warps": 1}):
                        y2 = torch.full((T, N), 7.0)
                        y2[t0:spans[-1][1]] = x[t0:spans[-1][1]] @ w.t() + b
                        diff_add(x[t0:spans[-1][1]], y2[t0:spans[-1][1]], table, tiles, n_tiles,
                                 i * len(GROUPS) + GROUPS.index(g), mod.BLOCK_N, cfg)
                        outs.append((f"1, staged G {cfg['G']}", y2))
                if pet == "maskbert" and path == "1":  # another config: BM 64 over 48-row tiles, BLOCK_K 64
                    tiles, n_tiles, table = sparse.launch_map(group, mod.TENSORS, 48)
                    y2 = torch.full((T, N), 7.0)
                    masked_linear(x[t0:spans[-1][1]], w, b, y2[t0:spans[-1][1]], table, tiles, n_tiles, 48,
                                  i * len(GROUPS) + GROUPS.index(g), True,
                                  {**MASK_INTERPRET_CONFIG, "BM": 64, "BLOCK_K": 64})
                    outs.append(("1, BM 64", y2))
                for name, out in outs:
                    err = float((out - ref).abs().max() / ref.abs().max())
                    worst[(pet, name)] = max(worst.get((pet, name), 0.0), err)
                    assert err < 1e-5, (pet, name, dims, g, i, err)
                    assert (out[:t0] == 7).all() and (out[spans[-1][1]:] == 7).all(), "rows outside the group touched"
print("worst", worst)
'''


def test_sparse_kernels_match_dense_reference():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "worst" in r.stdout
