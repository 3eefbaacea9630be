"""Compare the CUDA/Triton engine paths with the CPU/torch reference paths (bf16 within 2e-2).

    python bench/gpu_check.py                 # on the GPU box
    python bench/gpu_check.py --device cpu --small   # local smoke (kernel checks skipped)
    python bench/gpu_check.py --sparse        # diff / MaskBERT kernels (+ sweep timings) and engine checks
Writes $OUT/gpu_check.json (OUT defaults to ./bench_out). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schema.layout import LINEAR_SITES, PET_TYPES, BaseDims  # noqa: E402
from workers.config import Settings  # noqa: E402
from workers.engine.kernels import time_us, triton_available  # noqa: E402
from workers.engine.options import EngineOptions  # noqa: E402
from workers.engine.plan import Segments, _pad_index, _tiles  # noqa: E402
from workers.engine.pets import segmented  # noqa: E402
from workers.engine.pool import PoolConfig  # noqa: E402
from workers.engine.runtime import Engine  # noqa: E402
from workers.engine.synthetic import random_delta, random_packed, save_random_bert  # noqa: E402

TOL = 2e-2


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _segments(lens, slots, device, tiles: bool):
    pad, valid = _pad_index(lens, max(lens))
    seg = Segments(0, sum(lens), max(lens))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
    seg.seq_slots, seg.tok_slots = t(slots), t(np.repeat(slots, lens))
    seg.pad_idx, seg.valid_flat = t(pad), t(valid)
    if tiles:
        tl_ = _tiles(lens, slots)
        seg.tiles, seg.n_tiles = t(tl_), tl_.shape[1]
    return seg


def kernel_checks(device, results):
    rng = np.random.default_rng(0)
    for (K, R, members, N, act, bias) in [(768, 16, 2, 768, "none", False), (768, 64, 1, 768, "gelu", True),
                                          (3072, 48, 3, 768, "tanh", True), (768, 256, 1, 3072, "relu", False)]:
        S = 50
        lens = rng.integers(1, 140, size=40).tolist()
        slots = sorted(rng.integers(0, S, size=40).tolist())
        x = torch.randn(sum(lens), K, device=device, dtype=torch.bfloat16)
        A = (torch.randn(S, R, K, device=device) * 0.05).to(torch.bfloat16)
        ab = (torch.randn(S, R, device=device) * 0.1).to(torch.bfloat16) if bias else None
        rb = R // members
        B = (torch.randn(S, members, N, rb, device=device) * 0.05).to(torch.bfloat16)
        bb = (torch.randn(S, members, N, device=device) * 0.1).to(torch.bfloat16) if bias else None
        cols = [m * N for m in range(members)]
        y0 = torch.randn(sum(lens), members * N, device=device, dtype=torch.bfloat16)
        seg_t = _segments(lens, slots, device, True)
        seg_c = _segments(lens, slots, "cpu", False)
        xa_t = segmented.shrink(x, A, seg_t, ab, act)
        xa_c = segmented.shrink(x.float().cpu(), A.float().cpu(), seg_c, ab.float().cpu() if bias else None, act)
        y_t = y0.clone()
        segmented.expand_add(xa_t, B, seg_t, y_t, cols, bb)
        y_c = y0.float().cpu()
        segmented.expand_add(xa_c, B.float().cpu(), seg_c, y_c, cols, bb.float().cpu() if bias else None)
        name = f"sgmv K={K} R={R} members={members} N={N} act={act} bias={bias}"
        results.append({"check": name + " shrink", "rel_err": rel(xa_t, xa_c)})
        results.append({"check": name + " expand", "rel_err": rel(y_t - y0, y_c - y0.float().cpu())})
    try:
        fused_checks(device, results, rng)
    except Exception as exc:  # report, never hide
        import traceback
        traceback.print_exc()
        results.append({"check": f"fused LoRA checks crashed: {exc!r}"[:200], "rel_err": float("inf")})


def fused_checks(device, results, rng):
    """Fused LoRA shrink+expand kernel (every config) vs the torch path, y a strided q|k|v-like buffer."""
    from workers.engine.kernels.triton_lora import FUSED_CONFIGS, sgmv_lora_fused
    for (K, rb, members, N, cols) in [(768, 8, 2, 768, [0, 1536]), (768, 8, 3, 768, [0, 768, 1536]),
                                      (3072, 16, 1, 768, [0]), (768, 64, 1, 3072, [0]), (768, 4, 2, 768, [0, 1536])]:
        S = 50
        lens = rng.integers(1, 140, size=40).tolist()
        slots = sorted(rng.integers(0, S, size=40).tolist())
        R = rb * members
        x = torch.randn(sum(lens), K, device=device, dtype=torch.bfloat16)
        A = (torch.randn(S, 2, R, K, device=device) * 0.05).to(torch.bfloat16)[:, 1]  # strided like a bank layer
        B = (torch.randn(S, members, N, rb, device=device) * 0.05).to(torch.bfloat16)
        y0 = torch.randn(sum(lens), max(cols) + N + (768 if members == 2 else 0), device=device, dtype=torch.bfloat16)
        seg_t = _segments(lens, slots, device, True)
        seg_c = _segments(lens, slots, "cpu", False)
        y0_c = y0.float().cpu().clone()
        y_c = y0_c.clone()
        segmented.expand_add(segmented.shrink(x.float().cpu(), A.float().cpu(), seg_c), B.float().cpu(), seg_c, y_c, cols)
        worst = 0.0
        for cfg in FUSED_CONFIGS + [None]:
            y_t = y0.clone()
            sgmv_lora_fused(x, A, B, seg_t.tiles, seg_t.n_tiles, y_t, cols, config=cfg)
            worst = max(worst, rel(y_t.float().cpu() - y0_c, y_c - y0_c))
        results.append({"check": f"fused LoRA shrink+expand K={K} rb={rb} members={members} N={N} (all configs)",
                        "rel_err": worst})


def lora_microbench(device, out):
    """Old (shrink + expand) vs fused LoRA kernels at the benchmark shape: BERT-base q,v r8, 512 x 128 tokens,
    ~1 tenant per sequence out of 10,000 slots; and the realistic-length batch (lognormal 8-128)."""
    from workers.engine.kernels import triton_lora as tlr
    rng = np.random.default_rng(5)
    n_slots, K, rb, members, N = 10_000, 768, 8, 2, 768
    A = (torch.randn(n_slots, rb * members, K, device=device) * 0.05).to(torch.bfloat16)
    B = (torch.randn(n_slots, members, N, rb, device=device) * 0.05).to(torch.bfloat16)
    rows = {}
    shapes = {"fixed 512x128": [128] * 512}
    ls, tot = [], 0
    while True:
        n = int(np.clip(rng.lognormal(np.log(40), 0.6), 8, 128))
        if tot + n > 512 * 128:
            break
        ls.append(n)
        tot += n
    shapes[f"lengths 8-128 ({len(ls)} seqs)"] = ls
    for name, lens in shapes.items():
        T = sum(lens)
        slots = sorted(rng.choice(n_slots, size=len(lens), replace=False).tolist())
        seg = _segments(lens, slots, device, True)
        x = torch.randn(T, K, device=device, dtype=torch.bfloat16)
        y = torch.randn(T, 3 * N, device=device, dtype=torch.bfloat16)
        cols = [0, 2 * N]
        xa = segmented.shrink(x, A, seg)
        t_shrink = time_us(lambda: segmented.shrink(x, A, seg), 20)
        t_expand = time_us(lambda: segmented.expand_add(xa, B, seg, y, cols), 20)
        t_old = time_us(lambda: segmented.expand_add(segmented.shrink(x, A, seg), B, seg, y, cols), 20)
        tlr.sgmv_lora_fused(x, A, B, seg.tiles, seg.n_tiles, y, cols)  # tunes
        t_fused = time_us(lambda: tlr.sgmv_lora_fused(x, A, B, seg.tiles, seg.n_tiles, y, cols), 20)
        gb = (T * K * 2 + T * members * N * 2 * 2) / 1e9
        r = {"tiles": seg.n_tiles, "shrink_us": t_shrink, "expand_us": t_expand, "shrink+expand_us": t_old,
             "fused_us": t_fused, "fused_TB_s": gb / (t_fused * 1e-6) / 1e3, "old_TB_s": gb / (t_old * 1e-6) / 1e3,
             "fused_configs_us": {k: v for k, v in tlr.fused_timings.items() if k != "errors"}}
        rows[name] = r
        print(f"LoRA kernels {name}: tiles {seg.n_tiles}, shrink {t_shrink:.1f} us, expand {t_expand:.1f} us, "
              f"shrink+expand {t_old:.1f} us ({r['old_TB_s']:.2f} TB/s) | fused {t_fused:.1f} us "
              f"({r['fused_TB_s']:.2f} TB/s), per layer; x12 layers: old {t_old * 12e-3:.2f} ms, "
              f"fused {t_fused * 12e-3:.2f} ms", flush=True)
    print("fused configs (us):", json.dumps(tlr.fused_timings), flush=True)
    with open(os.path.join(out, "lora_kernels.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)


def engine_checks(device, small, results):
    tmp = tempfile.mkdtemp()
    h, L, heads, m = (64, 2, 4, 128) if small else (256, 4, 4, 1024)
    path = save_random_bert(tmp, hidden=h, layers=L, heads=heads, intermediate=m, vocab=1000, max_pos=160, std=0.05)
    dims = BaseDims(h, m, L, heads)
    deltas = {}
    for i in range(60):
        pet = PET_TYPES[i % len(PET_TYPES)]
        deltas[f"t{i}"] = random_delta(f"t{i}", pet, dims, seed=i, n_labels=2 + i % 5, r=[4, 8, 16][i % 3],
                                       sites=["q", "v", "ffn_out"] if i % 2 else None, pooling=["cls", "mean", "pooler"][i % 3],
                                       task="token_cls" if i % 7 == 0 else "seq_cls", bottleneck=32, scale=0.1,
                                       head_activation=[None, "tanh", None, "relu"][i % 4] if i % 7 else None)
    rng = np.random.default_rng(1)
    tenants = [f"t{int(rng.integers(60))}" for _ in range(120)]
    batch = random_packed(tenants, rng.integers(4, 128, size=120), vocab=1000, seed=2)
    runs = {}
    for name, dev, dt in (("cuda_bf16", device, torch.bfloat16), ("cuda_fp32", device, torch.float32),
                          ("cpu_fp32", "cpu", torch.float32)):
        if device == "cpu" and name != "cpu_fp32":
            dev = "cpu"
        eng = Engine(path, lambda t: deltas[t], device=dev, dtype=dt if dev != "cpu" else torch.float32,
                     pool_config=PoolConfig(default_slots=64), options=EngineOptions.from_settings(Settings()))
        try:
            runs[name] = (eng.run(batch, timeout=300), eng.encode_base(batch))
        finally:
            eng.close()
    ref, ref_base = runs["cpu_fp32"]
    for name in ("cuda_fp32", "cuda_bf16"):
        outs, base = runs[name]
        results.append({"check": f"base encoder hidden {name} vs cpu fp32", "rel_err": rel(base, ref_base),
                        "tol": 2e-2 if name == "cuda_fp32" else 5e-2})
        per_type: dict[str, list] = {}
        for oa, ob in zip(outs, ref):
            assert oa.error is None and ob.error is None, (oa.error, ob.error)
            d = deltas[oa.tenant_id]
            pet = d.pet_type + (" (two-layer head)" if "head" in d.config else "")
            if oa.logits is not None:
                e = rel(torch.tensor(oa.logits), torch.tensor(ob.logits))
                ps = float(np.abs(np.array(oa.scores) - np.array(ob.scores)).max())
            else:
                e = ps = float(np.abs(np.array(oa.token_scores) - np.array(ob.token_scores)).max())
            cur = per_type.setdefault(pet, [0.0, 0.0])
            cur[0], cur[1] = max(cur[0], e), max(cur[1], ps)
        for pet, (e, ps) in per_type.items():
            if name == "cuda_fp32":  # same precision: every CUDA path (Triton, streams, pool) must agree
                results.append({"check": f"engine mixed batch, {pet} rows, logits {name} vs cpu fp32", "rel_err": e})
            else:  # bf16 end to end through 4 random layers: activation rounding, not kernel error
                results.append({"check": f"engine mixed batch, {pet} rows, scores {name} vs cpu fp32 (info, tol 0.1)",
                                "rel_err": ps, "tol": 0.1})
                results.append({"check": f"engine mixed batch, {pet} rows, logits {name} vs cpu fp32 (info, tol 0.1)",
                                "rel_err": e, "tol": 0.1})


def norm_check(device, results):
    from workers.engine.kernels.triton_norm import add_layer_norm
    x = torch.randn(1000, 768, device=device, dtype=torch.bfloat16)
    r = torch.randn(1000, 768, device=device, dtype=torch.bfloat16)
    w = torch.randn(768, device=device, dtype=torch.bfloat16)
    b = torch.randn(768, device=device, dtype=torch.bfloat16)
    got = add_layer_norm(x, r, w, b, 1e-12)
    want = torch.nn.functional.layer_norm((x.float() + r.float()).cpu(), (768,), w.float().cpu(), b.float().cpu(), 1e-12)
    results.append({"check": "triton add+layernorm bf16 vs torch fp32", "rel_err": rel(got, want)})


def new_kernel_checks(device, results):
    """Packed-window attention, fused LN with per-row deltas, row affine, LoRA expand-into-GEMM."""
    import torch.nn.functional as F
    from workers.engine.kernels.triton_attn import packed_attention
    from workers.engine.kernels.triton_lora import sgmv_expand_init, sgmv_shrink
    from workers.engine.kernels.triton_norm import add_layer_norm, rows_affine_
    rng = np.random.default_rng(3)
    heads, d = 12, 64
    lens = np.clip(rng.lognormal(np.log(40), 0.6, size=300), 1, 128).astype(int).tolist()
    T = sum(lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    s = torch.tensor(np.repeat(cu[:-1], lens), device=device)
    e = torch.tensor(np.repeat(cu[1:], lens), device=device)
    qkv = torch.randn(T, 3 * heads * d, device=device, dtype=torch.bfloat16)
    got = packed_attention(qkv, s, e, heads)
    ref = []
    x = qkv.float()
    for b in range(len(lens)):
        q, k, v = (x[cu[b]:cu[b + 1], j * heads * d:(j + 1) * heads * d].view(-1, heads, d).transpose(0, 1) for j in range(3))
        ref.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(-1, heads * d))
    results.append({"check": "triton packed-window attention bf16 vs per-seq SDPA fp32", "rel_err": rel(got, torch.cat(ref))})
    N, S = 768, 20
    xx, rr = (torch.randn(T, N, device=device, dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(N, device=device, dtype=torch.bfloat16), torch.randn(N, device=device, dtype=torch.bfloat16)
    t0, t1 = 100, T - 50
    slots = torch.randint(0, S, (t1 - t0,), device=device)
    dw, db = (torch.randn(S, 3, N, device=device, dtype=torch.bfloat16)[:, 1] * 0.1 for _ in range(2))
    got = add_layer_norm(xx, rr, w, b, 1e-12, (t0, t1, slots, dw, db))
    pre = xx.float() + rr.float()
    want = F.layer_norm(pre, (N,), w.float(), b.float(), 1e-12)
    want[t0:t1] = F.layer_norm(pre[t0:t1], (N,), eps=1e-12) * (w.float() + dw.float()[slots]) + (b.float() + db.float()[slots])
    results.append({"check": "triton add+layernorm with per-row gamma/beta deltas", "rel_err": rel(got, want)})
    y = torch.randn(T, 3072, device=device, dtype=torch.bfloat16)
    sc, bi = (torch.randn(S, 3072, device=device, dtype=torch.bfloat16) for _ in range(2))
    want = y.float().clone()
    want[t0:t1] = want[t0:t1] * sc.float()[slots] + bi.float()[slots]
    want = F.gelu(want, approximate="tanh")
    got = rows_affine_(y.clone(), t0, t1, slots, sc, bi, "gelu_tanh")
    results.append({"check": "triton row scale+bias+gelu (BitFit/IA3 epilogue)", "rel_err": rel(got, want)})
    # LoRA expand written into the GEMM output, GEMM accumulates (beta = 1).
    K, R, members = 768, 16, 2
    slots_l = sorted(rng.integers(0, S, size=len(lens)).tolist())
    seg = _segments(lens, slots_l, device, True)
    A = (torch.randn(S, R, K, device=device) * 0.05).to(torch.bfloat16)
    B = (torch.randn(S, members, N, R // members, device=device) * 0.05).to(torch.bfloat16)
    W = (torch.randn(3 * N, K, device=device) * 0.03).to(torch.bfloat16)
    bias = torch.randn(3 * N, device=device, dtype=torch.bfloat16)
    xin = torch.randn(T, K, device=device, dtype=torch.bfloat16)
    xa = sgmv_shrink(xin, A, seg.tiles, seg.n_tiles)
    out = torch.empty(T, 3 * N, device=device, dtype=torch.bfloat16)
    sgmv_expand_init(xa, B, seg.tiles, seg.n_tiles, out, [0, 2 * N], bias)
    out.addmm_(xin, W.t())
    want = torch.addmm(bias.float(), xin.float(), W.float().t())
    seg_c = _segments(lens, slots_l, "cpu", False)
    xa_c = segmented.shrink(xin.float().cpu(), A.float().cpu(), seg_c)
    want = want.cpu()
    segmented.expand_add(xa_c, B.float().cpu(), seg_c, want, [0, 2 * N])
    results.append({"check": "LoRA expand-into-GEMM (init + addmm_) vs torch fp32", "rel_err": rel(out, want)})


def sparse_checks(device, results, out_dir, small=False):
    """Batched diff-pruning / MaskBERT kernels (issue 14) on BERT-base shapes, bf16, vs a dense fp32
    reference built from the raw deltas; then every config of a sweep against the default config's
    output and (GPU) its µs per call at a uniform six-type mix's share of a 512 x 128 batch (~85
    tenants x 128 tokens), next to cuBLAS on the same rows. --small on the CPU: the same under
    TRITON_INTERPRET=1 with tiny shapes and the interpreter's configs, no timings."""
    import types
    from workers.engine.kernels import triton_sparse as ts
    from workers.engine.pets import diff, maskbert
    from workers.engine.pets import sparse as sparse_pets
    from workers.engine.pets.common import GROUPS, SITE_GROUP, checked_tensors, group_in, group_out, site_col
    from workers.engine.plan import TILE_M, PetGroup
    dims = BaseDims(32, 64, 4, 2) if small else BaseDims(768, 3072, 12, 12)
    rng = np.random.default_rng(5)
    n_ten, seq = (6, 40) if small else (85, 128)
    dt = torch.float32 if small else torch.bfloat16  # the interpreter's dot is not bf16-exact (CPU smoke)
    if small:
        sweeps = {"diff": [{"CH": 16, "num_warps": 1}, {"G": 2, "KCH": 32, "CH": 8, "num_warps": 1}],
                  "maskbert": [ts.MASK_INTERPRET_CONFIG, {**ts.MASK_INTERPRET_CONFIG, "BM": 64, "BLOCK_K": 64}]}
    else:
        sweeps = {"diff": [{"CH": ch, "num_warps": nw} for ch in (16, 32, 64) for nw in (2, 4)]  # x gathered
                  + [{"G": g, "CH": ch, "num_warps": 4} for g in (1, 2, 4) for ch in (16, 32)]  # x staged
                  + [{"G": 4, "CH": 16, "num_warps": 8}, {"G": 1, "KCH": 128, "CH": 32, "num_warps": 4}],
                  "maskbert": [{"BM": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                               for bm, bn, bk, nw, ns in (
                                   (128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
                                   (128, 128, 128, 8, 2), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4),
                                   (128, 256, 32, 8, 3), (64, 128, 64, 8, 3), (64, 128, 32, 8, 4),
                                   (64, 64, 64, 4, 3), (64, 256, 64, 8, 3))]}
        assert ts.MASK_CONFIG in sweeps["maskbert"] and ts.DIFF_CONFIG in sweeps["diff"]
    timings = {}
    for pet, mod in (("diff", diff), ("maskbert", maskbert)):
        payloads = [random_delta(f"{pet}{k}", pet, dims, seed=k, density=0.01) for k in range(4)]
        packed = [mod.tenant_tensors(d, checked_tensors(d, dims), dims) for d in payloads]
        deltas = [payloads[k % 4] for k in range(n_ten)]  # 4 payloads, every tenant its own device copy
        residents = [types.SimpleNamespace(sparse={n: v.to(device, dt if v.is_floating_point() else v.dtype)
                                                   for n, v in packed[k % 4].items()}) for k in range(n_ten)]
        lens = rng.integers(8, 2 * seq, size=n_ten)
        lens[: n_ten // 2] = seq
        spans = np.concatenate([[0], np.cumsum(lens)])
        T = int(spans[-1])
        group = PetGroup(pet, None, Segments(0, T, int(lens.max())),
                         [(r, int(a), int(c)) for r, a, c in zip(residents, spans[:-1], spans[1:])])
        for g in GROUPS:
            N, K = group_out(g, dims), group_in(g, dims)
            hdr = 3 * len(GROUPS) + GROUPS.index(g)
            w = (torch.randn(N, K, device=device) * 0.03).to(dt)
            b = (torch.randn(N, device=device) * 0.1).to(dt)
            lw = types.SimpleNamespace(params=lambda site, w=w, b=b: (w, b))
            x = torch.randn(T, K, device=device, dtype=dt)
            base = torch.addmm(b.float(), x.float(), w.float().t())
            y_in = base.to(dt) if pet == "diff" else torch.zeros(T, N, device=device, dtype=dt)
            y = y_in.clone()
            mod.linear(group, 3, g, x, y, lw, None)
            err = 0.0
            for k in range(0, n_ten, 9):  # reference for every 9th tenant (dense fp32 on the device)
                d, a, c = deltas[k], int(spans[k]), int(spans[k + 1])
                wf, bf = w.float().clone(), b.float().clone()
                for s in [s for s in LINEAR_SITES if SITE_GROUP[s] == g]:
                    o, n = dims.site_shape(s)
                    col = site_col(s, dims)
                    if pet == "diff":
                        dd = torch.zeros(o * n, device=device)
                        dd[d.tensors[f"layers.3.{s}.delta_index"].to(device)] = \
                            d.tensors[f"layers.3.{s}.delta_value"].to(device).to(dt).float()
                        wf[col:col + o] += dd.view(o, n)
                    else:
                        m = np.unpackbits(d.tensors[f"layers.3.{s}.mask_bits"].numpy(), count=o * n, bitorder="little")
                        wf[col:col + o] *= torch.from_numpy(m.reshape(o, n)).to(device).float()
                want = torch.addmm(bf, x[a:c].float(), wf.t())
                err = max(err, rel(y[a:c], want))
            results.append({"check": f"batched {pet} {g} ({n_ten} tenants, {T} rows) {str(dt)[6:]} vs dense fp32",
                            "rel_err": err})
            # the sweep: every config's output vs the default's, then (GPU) its time; cuBLAS on the same rows for scale
            row = {"rows": T} if small else {"rows": T, "cublas_same_rows_us": time_us(lambda: torch.addmm(b, x, w.t()))}
            worst = 0.0
            for cfg in sweeps[pet]:
                tiles, n_tiles, table = sparse_pets.launch_map(group, mod.TENSORS, cfg.get("BM", TILE_M))
                scratch = y_in.clone()
                if pet == "diff":
                    fn = lambda: ts.diff_add(x, scratch, table, tiles, n_tiles, hdr, diff.BLOCK_N, cfg)  # noqa: E731
                else:
                    fn = lambda: ts.masked_linear(x, w, b, scratch, table, tiles, n_tiles, cfg["BM"], hdr, True,  # noqa: E731
                                                  cfg)
                key = json.dumps(cfg, sort_keys=True)
                try:
                    fn()  # once on y_in: diff adds, so the timing runs below do not count
                    worst = max(worst, rel(scratch - y_in, y - y_in))
                    if not small:
                        row[key] = time_us(fn)
                except Exception as exc:  # a config that does not build here is reported, not fatal
                    row[key] = repr(exc)[:120]
            results.append({"check": f"batched {pet} {g}: {len(sweeps[pet])} sweep configs vs the default config",
                            "rel_err": worst})
            timings[f"{pet} {g}"] = row
            if small:
                continue
            best = min(((v, k) for k, v in row.items() if k.startswith("{") and isinstance(v, float)), default=None)
            print(f"  {pet:8s} {g:8s} rows {T}: cuBLAS same rows {row['cublas_same_rows_us']:.1f} us; "
                  f"default {row.get(json.dumps(ts.DIFF_CONFIG if pet == 'diff' else ts.MASK_CONFIG, sort_keys=True))}; "
                  f"best {best}", flush=True)
    with open(os.path.join(out_dir, "sparse_kernels.json"), "w") as f:
        json.dump(timings, f, indent=1)


def lora_gemm_checks(device, results, out_dir):
    """Issue 14 item 1: the QKV GEMM with the LoRA delta in its epilogue vs torch fp32, and its
    time against cuBLAS alone and cuBLAS + the fused LoRA pass (BERT-base q|k|v, r8 q,v, 10,000
    slots), at 512 x 128 and at lengths 8-128 (same token budget)."""
    from workers.engine.kernels import triton_lora_gemm as lg
    from workers.engine.kernels.triton_lora import cols_tensor, sgmv_lora_fused, sgmv_shrink
    from workers.engine.plan import TILE_M
    rng = np.random.default_rng(11)
    K, NM, members, RB, S = 768, 768, 2, 8, 10_000
    W = (torch.randn(3 * NM, K, device=device) * 0.03).to(torch.bfloat16)
    bias = (torch.randn(3 * NM, device=device) * 0.1).to(torch.bfloat16)
    A = (torch.randn(S, members * RB, K, device=device) * 0.05).to(torch.bfloat16)
    B = (torch.randn(S, members, NM, RB, device=device) * 0.05).to(torch.bfloat16)
    cols = [0, 2 * NM]
    report = {}
    for name, lens in (("512x128", [128] * 512),
                       ("lengths 8-128", np.clip(rng.lognormal(np.log(40), 0.6, 1700), 8, 128).astype(int).tolist())):
        slots = sorted(rng.integers(0, S, size=len(lens)).tolist())
        seg = _segments(lens, slots, device, True)
        T = sum(lens)
        x = torch.randn(T, K, device=device, dtype=torch.bfloat16)
        tiles = lg.gemm_tiles(seg.tiles, seg.n_tiles, 0, T, T, TILE_M)
        ct = cols_tensor(cols, device)

        def epilogue():
            return lg.lora_gemm(x, W, bias, sgmv_shrink(x, A, seg.tiles, seg.n_tiles), B, tiles, 0, ct, TILE_M)
        got = epilogue()
        if name == "512x128":  # reference on a slice of rows (fp32)
            n = 4096
            xa = (x[:n].float().unsqueeze(1) @ A[seg.tok_slots[:n]].float().transpose(1, 2)).squeeze(1)
            want = x[:n].float() @ W.float().t() + bias.float()
            for m, c in enumerate(cols):
                want[:, c:c + NM] += (xa[:, m * RB:(m + 1) * RB].unsqueeze(1)
                                      @ B[seg.tok_slots[:n], m].float().transpose(1, 2)).squeeze(1)
            results.append({"check": "LoRA in the QKV GEMM epilogue (Triton) vs torch fp32", "rel_err": rel(got[:n], want)})

        def cublas():
            return torch.addmm(bias, x, W.t())

        def cublas_pass():
            y = torch.addmm(bias, x, W.t())
            sgmv_lora_fused(x, A, B, seg.tiles, seg.n_tiles, y, cols)
        no_lora = lg.gemm_tiles(seg.tiles, 0, 0, 0, T, TILE_M)  # every tile slot -1: the GEMM alone
        xa0 = sgmv_shrink(x, A, seg.tiles, seg.n_tiles)
        t = {"cublas_us": time_us(cublas), "cublas_plus_fused_lora_us": time_us(cublas_pass),
             "epilogue_us": time_us(epilogue), "shrink_us": time_us(lambda: sgmv_shrink(x, A, seg.tiles, seg.n_tiles)),
             "triton_gemm_alone_us": time_us(lambda: lg.lora_gemm(x, W, bias, xa0, B, no_lora, 0, ct, TILE_M))}
        report[name] = {"tokens": T, **{k: round(v, 1) for k, v in t.items()}}
        print(f"  QKV {name:14s} T={T}: cuBLAS {t['cublas_us']:.1f} us, + fused LoRA {t['cublas_plus_fused_lora_us']:.1f} us, "
              f"Triton GEMM with LoRA epilogue {t['epilogue_us']:.1f} us (shrink {t['shrink_us']:.1f}; the Triton GEMM "
              f"without LoRA tiles {t['triton_gemm_alone_us']:.1f})", flush=True)
    report["sweep_us"] = lg.sweep_us
    report["best_config"] = {str(k): v for k, v in lg.best_config.items()}
    print("  sweep (us):", json.dumps(lg.sweep_us), flush=True)
    with open(os.path.join(out_dir, "lora_gemm.json"), "w") as f:
        json.dump(report, f, indent=1)


def fp8_checks(device, results):
    """FP8 base (issue 14 item 3): the quantising kernels bit for bit against torch's e4m3 cast,
    the cuBLASLt GEMM against the dequantised fp32 product, and an engine on an FP8 base (CUDA
    bf16) against the same FP8 base emulated on the CPU in fp32, and against the bf16 base."""
    import tempfile
    from pathlib import Path

    import torch.nn.functional as F
    from workers.engine.derived import write_derived_base
    from workers.engine.encoder import Encoder
    from workers.engine.fp8 import FP8_KEY, Fp8Gemms, calibrate, quantize_ref, save_scales
    from workers.engine.kernels.triton_fp8 import quantize
    from workers.engine.kernels.triton_norm import add_layer_norm
    from workers.engine.model_loading import load_base
    from workers.engine.plan import build_plan

    def flips(a, b):  # share of e4m3 codes that differ
        return float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean())
    x = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16) * 3
    results.append({"check": "fp8 quantize kernel vs torch e4m3 cast (share of codes differing)",
                    "rel_err": flips(quantize(x, 1 / 0.02), quantize_ref(x, 1 / 0.02)), "tol": 0.0})
    g = F.gelu(x.float(), approximate="tanh")
    results.append({"check": "fp8 GELU+quantize kernel vs torch (share of codes differing)",
                    "rel_err": flips(quantize(x, 1 / 0.02, gelu=True), quantize_ref(g, 1 / 0.02)), "tol": 1e-3})
    xx, rr = (torch.randn(4096, 768, device=device, dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(768, device=device, dtype=torch.bfloat16), torch.randn(768, device=device, dtype=torch.bfloat16)
    out, q = add_layer_norm(xx, rr, w, b, 1e-12, None, 1 / 0.03)
    results.append({"check": "add+layernorm e4m3 output vs torch cast of its bf16 output (share differing)",
                    "rel_err": flips(q, quantize_ref(out, 1 / 0.03)), "tol": 0.0})
    path = save_random_bert(tempfile.mkdtemp(), 768, 4, 12, 3072, vocab=30522)
    base = load_base(path)
    gem = Fp8Gemms(base.to(device, torch.bfloat16), torch.full((4, 4), 6.0), torch.device(device), torch.bfloat16, True)
    xin = torch.randn(8192, 768, device=device, dtype=torch.bfloat16)
    xq = gem.quantize(0, "qkv", xin)
    got = gem.linear(0, "qkv", xq, base.layers[0].qkv_b.to(device, torch.bfloat16))
    wq = gem.w[0, "qkv"].float() * gem.w_scale[0, "qkv"]
    want = (xq.float() * gem.x_scale[0, "qkv"]) @ wq.t() + base.layers[0].qkv_b.to(device)
    results.append({"check": f"fp8 GEMM ({'cuBLASLt' if gem.native else 'emulated'}) vs dequantised fp32",
                    "rel_err": rel(got, want)})
    # An FP8 base of the random model, calibrated on random batches; engine CUDA bf16 vs CPU fp32.
    plans = [build_plan(b_.input_ids, None, b_.cu_seqlens, [None] * b_.num_seqs, 0, torch.device("cpu"), False)
             for b_ in (random_packed(["-"] * 8, [64] * 8, 30522, seed=70 + j) for j in range(2))]
    amax = calibrate(Encoder(base, "cpu", torch.float32), plans)
    fp8_dir = Path(tempfile.mkdtemp()) / "fp8"
    write_derived_base(path, fp8_dir, FP8_KEY, {"base": "random"})
    save_scales(str(fp8_dir), amax, {"base": "random"})
    batch = random_packed(["-"] * 24, np.random.default_rng(4).integers(8, 128, size=24).tolist(), 30522, seed=5)
    outs = {}
    for name, d, dev, dt in (("fp8 cuda bf16", fp8_dir, device, torch.bfloat16), ("fp8 cpu fp32", fp8_dir, "cpu", torch.float32),
                             ("bf16 cuda", path, device, torch.bfloat16)):
        eng = Engine(str(d), lambda t: None, device=dev, dtype=dt)
        try:
            outs[name] = eng.encode_base(batch).float().cpu()
        finally:
            eng.close()
    results.append({"check": "engine FP8 base: CUDA bf16 vs CPU fp32 emulation (info, tol 0.1)",
                    "rel_err": rel(outs["fp8 cuda bf16"], outs["fp8 cpu fp32"]), "tol": 0.1})
    results.append({"check": "engine FP8 base vs bf16 base, 4 random layers (info, tol 0.2)",
                    "rel_err": rel(outs["fp8 cuda bf16"], outs["bf16 cuda"]), "tol": 0.2})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--sparse", action="store_true", help="only the diff / MaskBERT kernel checks + engine checks")
    ap.add_argument("--fp8", action="store_true", help="only the FP8 base checks")
    ap.add_argument("--lora-gemm", action="store_true", help="only the LoRA-in-GEMM-epilogue check and timings")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "./bench_out")
    os.makedirs(out_dir, exist_ok=True)
    results: list[dict] = []
    if args.lora_gemm:
        try:
            lora_gemm_checks(args.device, results, out_dir)
        except Exception as exc:  # report, never hide
            import traceback
            traceback.print_exc()
            results.append({"check": f"LoRA GEMM checks crashed: {exc!r}"[:200], "rel_err": float("inf")})
    elif args.fp8:
        try:
            fp8_checks(args.device, results)
        except Exception as exc:  # report, never hide
            import traceback
            traceback.print_exc()
            results.append({"check": f"fp8 checks crashed: {exc!r}"[:200], "rel_err": float("inf")})
    elif triton_available() and (args.device != "cpu" or args.small):  # CPU: under TRITON_INTERPRET=1
        try:
            sparse_checks(args.device, results, out_dir, args.small)
        except Exception as exc:  # report, never hide
            import traceback
            traceback.print_exc()
            results.append({"check": f"sparse kernel checks crashed: {exc!r}"[:200], "rel_err": float("inf")})
    if args.device != "cpu" and triton_available() and not (args.sparse or args.fp8 or args.lora_gemm):
        try:
            lora_microbench(args.device, out_dir)
        except Exception as exc:  # report, never hide
            import traceback
            traceback.print_exc()
            results.append({"check": f"LoRA micro-benchmark crashed: {exc!r}"[:200], "rel_err": float("inf")})
        kernel_checks(args.device, results)
        norm_check(args.device, results)
        try:
            new_kernel_checks(args.device, results)
        except Exception as exc:  # report, never hide
            import traceback
            traceback.print_exc()
            results.append({"check": f"new kernel checks crashed: {exc!r}"[:200], "rel_err": float("inf")})
    elif not (args.sparse or args.fp8 or args.lora_gemm):
        print("kernel checks skipped (no CUDA/Triton)")
    if not (args.fp8 or args.lora_gemm):
        engine_checks(args.device, args.small, results)
    ok = True
    print(f"{'check':70s} {'rel_err':>10s}  ok")
    for r in results:
        r["ok"] = r["rel_err"] <= r.get("tol", TOL)
        ok &= r["ok"]
        print(f"{r['check']:70s} {r['rel_err']:10.2e}  {'PASS' if r['ok'] else 'FAIL'}")
    dev_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump({"device": dev_name, "tolerance": TOL, "results": results, "ok": ok}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
