"""The Triton fast path (packed-window attention, LoRA expand into the GEMM, fused add+LayerNorm
with BitFit per-row gamma/beta, row-wise BitFit bias / IA3 scale epilogues, batched diff-pruning
and MaskBERT) run on CPU through
Triton's interpreter (TRITON_INTERPRET=1, fp32) must match the plain torch path."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import triton  # noqa: F401  - a dependency of Linux torch wheels and of the dev extra: must be here

CHILD = r'''
import pickle, sys
import numpy as np, torch
torch.set_num_threads(1)
from schema.layout import BaseDims
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine
from workers.engine.synthetic import random_delta, random_packed, save_random_bert
out, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
h, L, heads, m = 32, 2, 2, 64
save_random_bert(path, hidden=h, layers=L, heads=heads, intermediate=m, vocab=300, max_pos=80, std=0.05)
dims = BaseDims(h, m, L, heads)
import workers.engine.kernels.triton_lora_gemm as lg
calls, inner = [], lg.lora_gemm
lg.lora_gemm = lambda *a, **k: calls.append(1) or inner(*a, **k)
# "all": every PET type (diff / MaskBERT: batched sparse kernels); "lora": one LoRA group (r8 q,v),
# whose delta goes into the epilogue of the Triton GEMM
kinds = ["lora", "bitfit", "ia3", "adapter", "diff", "maskbert"] if mode == "all" else ["lora"]
one = mode == "lora"
deltas = {f"t{i}": random_delta(f"t{i}", kinds[i % len(kinds)], dims, seed=i, n_labels=2 + i % 3,
                                r=8 if one else [4, 8][i % 2],
                                sites=["q", "v", "ffn_out"] if i % 2 and not one else None, bottleneck=16, scale=0.1,
                                pooling=["cls", "mean"][i % 2], task="token_cls" if i % 5 == 0 else "seq_cls")
          for i in range(12)}
rng = np.random.default_rng(0)
batch = random_packed([f"t{int(rng.integers(12))}" for _ in range(14)], rng.integers(3, 70, size=14), vocab=300, seed=1)
from workers.engine.options import EngineOptions
eng = Engine(path, lambda t: deltas[t], device="cpu", dtype=torch.float32, pool_config=PoolConfig(default_slots=16),
             options=EngineOptions(lora_gemm="auto"))  # auto = on under the interpreter
fast = eng.encoder.fast
outs = eng.run(batch, timeout=600)
eng.close()
pickle.dump((fast, [(o.error, o.logits, o.token_scores) for o in outs], len(calls)), open(out, "wb"))
'''


def _run(tmp_path, name, interpret, mode="all"):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / f"{name}.pkl"
    subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / name), mode], check=True, cwd=root, env=env,
                   timeout=600)
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_fast_path_matches_torch_path(tmp_path, mode):
    fast_on, fast, epilogue_calls = _run(tmp_path, "fast", True, mode)
    fast_off, ref, _ = _run(tmp_path, "ref", False, mode)
    assert fast_on and not fast_off
    if mode == "lora":  # q|v output of each layer from the Triton GEMM with the LoRA epilogue
        assert epilogue_calls == 2
    for (ea, la, ta), (eb, lb, tb) in zip(fast, ref):
        assert ea is None and eb is None
        if la is not None:
            a, b = np.array(la), np.array(lb)
        else:
            a, b = np.array(ta), np.array(tb)
        # tanh-GELU epilogue on the fast path vs erf-GELU: ~1e-3 relative
        assert np.abs(a - b).max() <= 5e-3 * max(1.0, np.abs(b).max())


FUSED_CHILD = r'''
import numpy as np, torch
from workers.engine.plan import Segments, _pad_index, _tiles
from workers.engine.pets import segmented
from workers.engine.kernels.triton_lora import FUSED_CONFIGS, sgmv_lora_fused
t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
rng = np.random.default_rng(0)
worst = 0.0
# (K, rb, members, N, cols, configs): q,v into a q|k|v buffer, q,k,v, one member, unaligned columns
cases = [(64, 8, 2, 48, [0, 96], [None, (64, 128, 1, 4, 2), (16, 64, 1, 4, 2), (32, 32, 1, 4, 2, True)]),
         (96, 4, 3, 32, [0, 32, 64], [None, (32, 256, 2, 4, 2), (16, 16, 1, 4, 2, True)]),
         (40, 16, 1, 80, [5], [None, (64, 256, 2, 8, 2), (32, 64, 3, 4, 2, True)])]
for K, rb, members, N, cols, cfgs in cases:
    lens = [130, 5, 70, 64, 1, 20]
    slots = [0, 1, 1, 3, 4, 4]
    T, S, R = sum(lens), 5, rb * members
    x = torch.randn(T, K)
    A = (torch.randn(S, 2, R, K) * 0.1)[:, 1]  # a bank layer: strided slots
    B = torch.randn(S, members, N, rb) * 0.1
    y0 = torch.randn(T, max(cols) + N + 3)
    pad, valid = _pad_index(lens, max(lens))
    seg = Segments(0, T, max(lens))
    seg.seq_slots, seg.pad_idx, seg.valid_flat = t(slots), t(pad), t(valid)
    ref = y0.clone()
    segmented.expand_add(segmented.shrink(x, A, seg), B, seg, ref, cols)
    tiles = _tiles(lens, slots)
    for cfg in cfgs:
        y = y0.clone()
        sgmv_lora_fused(x, A, B, t(tiles), tiles.shape[1], y, cols, config=cfg)
        worst = max(worst, float((y - ref).abs().max() / (ref - y0).abs().max()))
print("WORST", worst)
'''


def test_fused_lora_kernel_interpret():
    """The fused LoRA shrink+expand kernel (row sub-blocks, column splits, several members, strided
    slots, unaligned columns) under the Triton interpreter vs the torch shrink/expand path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", FUSED_CHILD], check=True, cwd=root, env=env, timeout=600,
                         capture_output=True, text=True).stdout
    worst = float(out.split("WORST")[1])
    assert worst <= 1e-5, worst
