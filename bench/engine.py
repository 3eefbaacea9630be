"""Flock engine benchmark (not a test). BERT-base shape, random weights, bf16, seq 128, batch 512.

Rows: HF eager base, HF sdpa base, our base, our 10k mixed LoRA r8 (q,v) tenants (all resident),
a mix of all PET types, PEFT mixed-adapter batch (adapter_names=, 32 adapters), PEFT per-tenant
sequential batch-1, and a realistic length distribution (8-128 tokens, same token budget).
"fwd" rows time the GPU work of a prepared batch; "e2e" rows go through Engine.submit (adapter
acquire, plan building, H2D, forward, heads, D2H, RequestOutputs) with 2 batches in flight.

    python bench/engine.py                       # GPU
    python bench/engine.py --device cpu --small  # smoke
    python bench/engine.py --quick               # forward alone vs Engine.submit + outputs, 2 shapes
    python bench/engine.py --mix                 # issue 14: base, LoRA, six / four types mixed, FP8 base
Writes $OUT/engine_bench.json and $OUT/engine_bench.png (OUT defaults to ./bench_out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schema.layout import BaseDims  # noqa: E402
from workers.config import Settings  # noqa: E402
from workers.engine import heads  # noqa: E402
from workers.engine.options import EngineOptions  # noqa: E402
from workers.engine.plan import build_plan  # noqa: E402
from workers.engine.pool import PoolConfig, Resident  # noqa: E402
from workers.engine.runtime import Engine  # noqa: E402
from workers.engine.synthetic import random_delta, random_packed, save_random_bert  # noqa: E402


def sync(dev):
    if dev != "cpu":
        torch.cuda.synchronize()


def timeit(fn, dev, iters, warmup=2):
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters


class Bench:
    def __init__(self, args):
        self.dev = args.device
        self.small = args.small
        if self.small:
            self.h, self.L, self.H, self.m, self.B, self.S, self.n_lora = 64, 2, 4, 128, 16, 32, 200
            self.iters = 2
        else:
            self.h, self.L, self.H, self.m, self.B, self.S, self.n_lora = 768, 12, 12, 3072, 512, 128, 10_000
            self.iters = 10
        self.quick = getattr(args, "quick", False)
        self.mix_only = getattr(args, "mix", False)
        self.e2e_rounds = 3 if self.quick and not self.small else 1
        self.dims = BaseDims(self.h, self.m, self.L, self.H)
        self.path = save_random_bert(tempfile.mkdtemp(), self.h, self.L, self.H, self.m, vocab=30522)
        self.dtype = torch.bfloat16 if self.dev != "cpu" else torch.float32
        self.rows: list[dict] = []
        self._base_delta = {}

    def add(self, name, seqs, tokens, seconds, note=""):
        r = {"name": name, "seq_s": seqs / seconds, "tok_s": tokens / seconds, "ms_per_batch": seconds * 1e3,
             "seqs_per_batch": seqs, "note": note}
        self.rows.append(r)
        print(f"  {name:48s} {r['seq_s']:10.0f} seq/s {r['tok_s']:12.0f} tok/s {r['ms_per_batch']:8.2f} ms  {note}",
              flush=True)
        return r

    def realistic(self, rng):
        """Lengths 8-S (lognormal around 40), same token budget as the fixed B x S batch."""
        def lengths():
            ls, tot = [], 0
            while True:
                n = int(np.clip(rng.lognormal(np.log(40), 0.6), 8, self.S))
                if tot + n > self.B * self.S:
                    return ls
                ls.append(n)
                tot += n
        return lengths

    # ---- tenants -----------------------------------------------------------------------------
    def loader(self, tid: str):
        kind, idx = tid.split("-")
        idx = int(idx)
        key = (kind, idx % 16)  # 16 distinct random payloads per kind, every tenant its own slot
        if key not in self._base_delta:
            kw = {"lora": {}, "adapter": {}, "bitfit": {}, "ia3": {}, "diff": {"density": 0.01},
                  "maskbert": {}}[kind]
            self._base_delta[key] = random_delta(tid, kind, self.dims, seed=idx % 16, **kw)
        d = self._base_delta[key]
        return type(d)(tid, 1, d.pet_type, d.config, d.tensors)

    # ---- rows --------------------------------------------------------------------------------
    def hf_rows(self, ids):
        from transformers import BertModel
        for impl in ("eager", "sdpa"):
            model = BertModel.from_pretrained(self.path, attn_implementation=impl).to(self.dev, self.dtype).eval()
            with torch.inference_mode():
                t = timeit(lambda: model(input_ids=ids), self.dev, self.iters)
            self.add(f"HF {impl} base (fwd)", self.B, self.B * self.S, t)
            del model

    def peft_rows(self, ids):
        from peft import LoraConfig, get_peft_model
        from transformers import BertModel
        model = BertModel.from_pretrained(self.path, attn_implementation="eager").to(self.dev, self.dtype).eval()
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
        pm = get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, 32):
            pm.add_adapter(f"a{i}", cfg)
        pm.eval()
        names = [f"a{i % 32}" for i in range(self.B)]
        with torch.inference_mode():
            t = timeit(lambda: pm(input_ids=ids, adapter_names=names), self.dev, max(2, self.iters // 3), warmup=1)
            self.add("PEFT mixed batch, 32 LoRA adapters (fwd)", self.B, self.B * self.S, t)
            n = 64 if not self.small else 8

            def seq():
                for i in range(n):
                    pm.set_adapter(f"a{i % 32}")
                    pm(input_ids=ids[i:i + 1])
            t = timeit(seq, self.dev, 1, warmup=1)
            self.add("PEFT per-tenant sequential batch-1 (fwd)", n, n * self.S, t)
        del pm, model

    def fp8_rows(self, cfg, fwd_rate, lora_fixed) -> dict:
        """FP8 base rows (issue 14 item 3): the same random base, its GEMM inputs calibrated on 4
        random batches in fp32, served in e4m3 (cuBLASLt on CUDA); base alone and 10k mixed LoRA."""
        from pathlib import Path

        from workers.engine.derived import write_derived_base
        from workers.engine.encoder import Encoder
        from workers.engine.fp8 import FP8_KEY, calibrate, save_scales
        from workers.engine.model_loading import load_base
        dev = torch.device(self.dev)
        ref = Encoder(load_base(self.path), dev, torch.float32)
        plans = [build_plan(b.input_ids, None, b.cu_seqlens, [None] * b.num_seqs, 0, dev, False)
                 for b in (random_packed(["-"] * 64, [self.S] * 64, 30522, seed=900 + j) for j in range(4))]
        amax = calibrate(ref, plans)
        del ref, plans
        out = Path(tempfile.mkdtemp()) / "fp8"
        meta = {"base": "random", "calibration": "4 random batches"}
        write_derived_base(self.path, out, FP8_KEY, meta)
        save_scales(str(out), amax, meta)
        eng8 = Engine(str(out), self.loader, device=self.dev, dtype=self.dtype, pool_config=cfg,
                      options=EngineOptions.from_settings(Settings()))
        try:
            print("  FP8 base:", eng8.tuned_choices()["fp8_base"], flush=True)
            bb = random_packed(["-"] * self.B, [self.S] * self.B, 30522)
            plan = build_plan(bb.input_ids, None, bb.cu_seqlens, [None] * self.B, 0, dev, eng8._want_tiles)
            with torch.inference_mode():
                t = timeit(lambda: eng8.encoder.forward(plan), self.dev, self.iters)
                if self.dev != "cpu":
                    profile_table(lambda: eng8.encoder.forward(plan), "Flock FP8 base (fwd)")
            row_base = self.add("Flock FP8 base (fwd)", self.B, self.B * self.S, t, "e4m3 shared GEMMs, static scales")
            eng8.prefetch([f"lora-{i}" for i in range(self.n_lora)]).result()
            row_lora = fwd_rate(f"Flock FP8 base + {self.n_lora} mixed LoRA r8 q,v (fwd)", lora_fixed,
                                "LoRA deltas in the serving dtype", engine=eng8)
        finally:
            eng8.close()
        return {"base": row_base, "lora": row_lora}

    def ours(self):
        cfg = PoolConfig(device_bytes=(30 << 30) if not self.small else (1 << 30), host_bytes=2 << 30,
                         default_slots=512, slots={"lora:r8:q,v": self.n_lora + 256, "head:c2": self.n_lora + 4096})
        eng = Engine(self.path, self.loader, device=self.dev, dtype=self.dtype, pool_config=cfg,
                     options=EngineOptions.from_settings(Settings()))  # FLOCK_LORA_FUSED etc. apply
        enc, B, S = eng.encoder, self.B, self.S
        rng = np.random.default_rng(0)
        try:
            # Our base: plan without tenants, forward only.
            base_batch = random_packed(["-"] * B, [S] * B, 30522)
            plan = build_plan(base_batch.input_ids, None, base_batch.cu_seqlens, [None] * B, 0,
                              torch.device(self.dev), eng._want_tiles)
            with torch.inference_mode():
                t_base = timeit(lambda: enc.forward(plan), self.dev, self.iters)
            base = self.add("Flock base (fwd)", B, B * S, t_base)

            t0 = time.perf_counter()
            n_ok = eng.prefetch([f"lora-{i}" for i in range(self.n_lora)]).result()
            print(f"  prefetched {n_ok} LoRA tenants in {time.perf_counter() - t0:.1f} s; "
                  f"pool {sum(b.nbytes() for b in eng.pool.banks.values()) / 2**30:.2f} GiB", flush=True)

            def lora_batches(k, lengths_fn):
                return [random_packed([f"lora-{int(x)}" for x in rng.integers(0, self.n_lora, size=len(ls))], ls, 30522,
                                      seed=j) for j, ls in enumerate(lengths_fn() for _ in range(k))]

            def fwd_rate(name, batches, note="", profile=False, engine=None):
                e = engine or eng
                plans, held = [], []
                for b in batches:
                    got = e.pool.acquire(b.tenant_ids)
                    held += [r for r in got.values() if isinstance(r, Resident)]
                    res = [got[t] for t in b.tenant_ids]
                    plans.append(build_plan(b.input_ids, None, b.cu_seqlens, res, 0, torch.device(self.dev),
                                            e._want_tiles))
                    plans[-1].layer_events = e.pool.layer_events(res)
                it = iter(range(10**9))
                en = e.encoder

                def step():
                    p = plans[next(it) % len(plans)]
                    hidden = en.forward(p)
                    pooled = heads.pool_hidden(hidden, p, en.base.pooler_w, en.base.pooler_b)
                    for hg in p.heads:
                        if hg.seq_order:
                            heads.seq_logits(hg, pooled)
                with torch.inference_mode():
                    t = timeit(step, self.dev, self.iters, warmup=len(plans) + 1)
                    if profile and self.dev != "cpu":
                        profile_table(step, name)
                e.pool.release(held)
                seqs = np.mean([b.num_seqs for b in batches])
                toks = np.mean([b.num_tokens for b in batches])
                return self.add(name, seqs, toks, t, note)

            def e2e_rate(name, batches, rounds=None):
                """Engine.submit end to end, outputs materialised the way the worker does it: one
                reply ``outputs`` map per request (replies.outputs_of) while later batches compute."""
                try:
                    from workers.serving.replies import outputs_of
                except ImportError:  # GPU host without the serving deps (msgspec): the same work
                    def outputs_of(o):
                        if hasattr(o, "reply_outputs"):
                            return o.reply_outputs()
                        if o.token_labels is not None:  # a RequestOutput (older engines)
                            return {"token_labels": list(o.token_labels),
                                    "token_scores": [max(p) for p in o.token_scores]}
                        return {"label": o.label, "scores": [float(x) for x in o.scores], "labels": list(o.labels)}
                for f in [eng.submit(b) for b in batches[:2]]:
                    f.result()
                rounds = rounds or self.e2e_rounds
                t = time.perf_counter()
                futs = [eng.submit(b) for _ in range(rounds) for b in batches]
                errs, gpu_ms, prep_ms, mat_s = 0, [], [], 0.0
                for f in futs:
                    out = f.result()
                    t_m = time.perf_counter()
                    for i in range(len(out)):
                        o = out[i]
                        if o.error is not None:
                            errs += 1
                        else:
                            outputs_of(o)
                    mat_s += time.perf_counter() - t_m
                    gpu_ms.append(out.timings.get("gpu_ms", 0.0) if hasattr(out, "timings") else 0.0)
                    prep_ms.append(out.timings.get("prep_ms", 0.0) if hasattr(out, "timings") else 0.0)
                dt = time.perf_counter() - t
                assert errs == 0, f"{errs} failed requests"
                n = len(futs)
                seqs = sum(b.num_seqs for b in batches) * rounds
                return self.add(name, seqs / n, sum(b.num_tokens for b in batches) * rounds / n, dt / n,
                                f"gpu {np.mean(gpu_ms):.2f} ms/batch, launcher prep {np.mean(prep_ms):.2f} ms/batch, "
                                f"materialise {mat_s / seqs * 1e6:.2f} us/request")

            def uniform_rows():
                """Issue 14's rows: every sequence's PET type drawn uniformly, tenants uniformly from
                200 per type (~75 distinct tenants of each type per batch)."""
                def batches(kinds, seed0):
                    return [random_packed([f"{kinds[int(rng.integers(len(kinds)))]}-{int(rng.integers(0, 200))}"
                                           for _ in range(B)], [S] * B, 30522, seed=seed0 + j) for j in range(4)]
                six = fwd_rate("Flock all six types uniformly mixed (fwd)",
                               batches(["lora", "adapter", "bitfit", "ia3", "diff", "maskbert"], 300),
                               "1/6 each; diff 1 % density, MaskBERT 10 % masked out", profile=True)
                four = fwd_rate("Flock four banked types uniformly mixed (fwd)",
                                batches(["lora", "adapter", "bitfit", "ia3"], 400), "LoRA, adapter, BitFit, IA3: 1/4 each")
                return six, four

            fixed = lora_batches(8, lambda: [S] * B)
            if self.mix_only:  # issue 14's rows only (fits one short device call)
                lora = fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd)", fixed, "uniform over all tenants; "
                                "FLOCK_LORA_GEMM as set (auto: timed)", profile=True)
                if enc.fast:  # both sides of the LoRA-in-GEMM-epilogue choice, whatever auto picked
                    opts = enc.options
                    for mode, label in (("1", "Triton GEMM, LoRA in its epilogue"), ("0", "cuBLAS + LoRA pass")):
                        enc.options = dataclasses.replace(opts, lora_gemm=mode)
                        fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd, {label})", fixed, f"FLOCK_LORA_GEMM={mode}",
                                 profile=mode == "1")
                    enc.options = opts
                    print("  LoRA GEMM epilogue choice (us per call):", enc.tuned.lora_gemm_us, flush=True)
                six, four = uniform_rows()
                fp8 = self.fp8_rows(cfg, fwd_rate, fixed)
                return base, lora, six, four, fp8
            if self.quick:  # forward alone vs submit, fixed 512 x 128 and lengths 8-128: nothing else
                out = {}
                lf = fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd)", fixed, "prebuilt plans")
                le = e2e_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (e2e submit)", fixed)
                real = lora_batches(8, self.realistic(rng))
                rf = fwd_rate(f"Flock {self.n_lora} mixed LoRA, lengths 8-{S} (fwd)", real,
                              f"~{int(np.mean([b.num_seqs for b in real]))} seqs/batch, prebuilt plans")
                re_ = e2e_rate(f"Flock {self.n_lora} mixed LoRA, lengths 8-{S} (e2e submit)", real)
                out.update(fixed_fwd=lf, fixed_e2e=le, real_fwd=rf, real_e2e=re_)
                return out
            lora_fwd = fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd)", fixed, "uniform over all tenants",
                                profile=True)
            if enc.fast:  # the previous separate shrink / expand kernels, for comparison
                opts = enc.options
                enc.options = dataclasses.replace(opts, lora_fused="0")
                fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd, separate kernels)", fixed,
                         "previous shrink + expand kernels")
                enc.options = opts
                print("  LoRA fused-vs-separate choice (us per call):", enc.tuned.lora_fused_us, flush=True)
            if enc.fast:  # both LoRA paths, keep the faster one for the rest of the run
                first = enc.lora_into_gemm
                enc.lora_into_gemm = not first
                alt = fwd_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (fwd, alt)", fixed,
                               "expand into GEMM" if not first else "expand RMW after GEMM")
                lora_fwd["note"] += "; expand into GEMM" if first else "; expand RMW after GEMM"
                if alt["seq_s"] > lora_fwd["seq_s"]:
                    lora_fwd = alt
                else:
                    enc.lora_into_gemm = first
                self.lora_into_gemm = enc.lora_into_gemm
                print(f"  LoRA expand into GEMM: {enc.lora_into_gemm}", flush=True)
            lora_e2e = e2e_rate(f"Flock {self.n_lora} mixed LoRA r8 q,v (e2e submit)", fixed)

            # Realistic lengths, same token budget as the fixed batch.
            real = lora_batches(8, self.realistic(rng))
            real_fwd = fwd_rate(f"Flock {self.n_lora} mixed LoRA, lengths 8-{S} (fwd)", real,
                                f"~{int(np.mean([b.num_seqs for b in real]))} seqs/batch", profile=True)
            rplan = build_plan(real[0].input_ids, None, real[0].cu_seqlens, [None] * real[0].num_seqs, 0,
                               torch.device(self.dev), eng._want_tiles)
            with torch.inference_mode():
                t_rb = timeit(lambda: enc.forward(rplan), self.dev, self.iters)
            self.add(f"Flock base, lengths 8-{S} (fwd)", real[0].num_seqs, real[0].num_tokens, t_rb)
            real_e2e = e2e_rate(f"Flock {self.n_lora} mixed LoRA, lengths 8-{S} (e2e submit)", real)

            # All PET types in one batch: banked types dominate, diff/maskbert a few tenants each.
            def mix_batch(j):
                kinds = ["lora"] * 4 + ["adapter"] * 4 + ["bitfit"] * 3 + ["ia3"] * 3
                ts = [f"{kinds[i % len(kinds)]}-{int(rng.integers(0, 200))}" for i in range(B - B // 16)]
                ts += [f"diff-{i % 4}" for i in range(B // 32)] + [f"maskbert-{i % 4}" for i in range(B // 32)]
                ts = [ts[i] for i in rng.permutation(len(ts))]
                return random_packed(ts, [S] * len(ts), 30522, seed=100 + j)
            mix = [mix_batch(j) for j in range(4)]
            eng.run(mix[0])  # load the tenants
            mix_fwd = fwd_rate("Flock all PET types mixed (fwd)", mix, "banked 94%, diff 3%, maskbert 3%")
            mix_banked = [random_packed([t for t in b.tenant_ids if not t.startswith(("diff", "maskbert"))],
                                        [S] * sum(not t.startswith(("diff", "maskbert")) for t in b.tenant_ids), 30522)
                          for b in mix]
            fwd_rate("Flock LoRA+adapter+BitFit+IA3 mixed (fwd)", mix_banked, "no sparse types")
            self.uniform = uniform_rows()
        finally:
            self.choices = eng.tuned_choices()
            eng.close()
        return base, lora_fwd, lora_e2e, real_fwd, real_e2e, mix_fwd


def print_table(rows, ratios):
    print("\n| row | seq/s | tokens/s | ms/batch | note |\n|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['seq_s']:,.0f} | {r['tok_s']:,.0f} | {r['ms_per_batch']:.2f} | {r['note']} |")
    print("\n| ratio | value |\n|---|---:|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")


def quick_report(b, out, dev_name):
    r = b.ours()
    ratios = {"submit_vs_fwd_512x128": r["fixed_e2e"]["seq_s"] / r["fixed_fwd"]["seq_s"],
              "submit_vs_fwd_lengths_8_128": r["real_e2e"]["seq_s"] / r["real_fwd"]["seq_s"]}
    print("\n| path | seq/s | ms/batch | vs forward pass | note |\n|---|---:|---:|---:|---|")
    for fwd, e2e, label in (("real_fwd", "real_e2e", f"lengths 8-{b.S}"), ("fixed_fwd", "fixed_e2e", f"{b.B} x {b.S}")):
        f, e = r[fwd], r[e2e]
        print(f"| forward pass, {label} (~{f['seqs_per_batch']:.0f} seqs/batch) | {f['seq_s']:,.0f} | "
              f"{f['ms_per_batch']:.2f} | 1.00 | {f['note']} |")
        print(f"| `Engine.submit` + outputs, {label} | {e['seq_s']:,.0f} | {e['ms_per_batch']:.2f} | "
              f"**{e['seq_s'] / f['seq_s']:.2f}** | {e['note']} |")
    with open(os.path.join(out, "engine_submit.json"), "w") as f:
        json.dump({"device": dev_name, "torch": torch.__version__, "config": {"hidden": b.h, "layers": b.L,
                   "batch": b.B, "seq": b.S, "dtype": str(b.dtype), "lora_tenants": b.n_lora,
                   "e2e_rounds": b.e2e_rounds}, "rows": b.rows, "ratios": ratios}, f, indent=1, default=str)
    return ratios


def profile_table(step, name):
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"--- profile: {name} (2 batches) ---")
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = ka.table(sort_by=key, row_limit=14, max_name_column_width=60)
        except Exception:
            continue
        print(table)
        with open(os.path.join(os.environ.get("OUT", "./bench_out"), "profiles.txt"), "a") as f:
            f.write(f"--- profile: {name} (2 batches) ---\n{table}\n")
        return


def lora_choice(b):
    from workers.engine.kernels import triton_lora
    return {"mode": b.choices["lora_fused"], "fused_vs_separate": b.choices["tuned_lora_fused_us"],
            "fused_configs": triton_lora.fused_timings}


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1))
    ax.barh([r["name"] for r in rows][::-1], [r["seq_s"] for r in rows][::-1])
    ax.set_xlabel("sequences / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="only forward-alone vs Engine.submit (+ outputs) at 512 x 128 and at lengths 8-128, "
                         "with the ratios; writes $OUT/engine_submit.json")
    ap.add_argument("--mix", action="store_true",
                    help="only issue 14's rows: our base, 10k mixed LoRA, all six / four banked PET types "
                         "uniformly mixed, FP8 base alone and with 10k mixed LoRA")
    args = ap.parse_args()
    out = os.environ.get("OUT", "./bench_out")
    os.makedirs(out, exist_ok=True)
    b = Bench(args)
    dev_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, hidden {b.h}, layers {b.L}, batch {b.B} x {b.S}", flush=True)
    if args.quick:
        return quick_report(b, out, dev_name)
    if args.mix:
        base, lora, six, four, fp8 = b.ours()
        ratios = {"lora_fwd_vs_our_base": lora["seq_s"] / base["seq_s"],
                  "mix6_uniform_fwd_vs_our_base": six["seq_s"] / base["seq_s"],
                  "mix4_uniform_fwd_vs_our_base": four["seq_s"] / base["seq_s"],
                  "fp8_base_vs_our_base": fp8["base"]["seq_s"] / base["seq_s"],
                  "fp8_lora_vs_our_base": fp8["lora"]["seq_s"] / base["seq_s"]}
        print_table(b.rows, ratios)
        with open(os.path.join(out, "engine_mix.json"), "w") as f:
            json.dump({"device": dev_name, "torch": torch.__version__, "rows": b.rows, "ratios": ratios}, f, indent=1)
        return ratios
    ids = torch.randint(1000, 30522, (b.B, b.S), device=args.device)
    if not args.skip_baselines:
        b.hf_rows(ids)
    base, lora_fwd, lora_e2e, real_fwd, real_e2e, mix_fwd = b.ours()
    if not args.skip_baselines:
        b.peft_rows(ids)
    hf = next((r for r in b.rows if r["name"].startswith("HF eager")), None)
    ratios = {
        "lora_fwd_vs_our_base": lora_fwd["seq_s"] / base["seq_s"],
        "lora_e2e_vs_our_base": lora_e2e["seq_s"] / base["seq_s"],
        "realistic_vs_fixed_tok_s_fwd": real_fwd["tok_s"] / lora_fwd["tok_s"],
        "realistic_vs_fixed_tok_s_e2e": real_e2e["tok_s"] / lora_e2e["tok_s"],
        "mix_fwd_vs_our_base": mix_fwd["seq_s"] / base["seq_s"],
    }
    six, four = b.uniform
    ratios["mix6_uniform_fwd_vs_our_base"] = six["seq_s"] / base["seq_s"]
    ratios["mix4_uniform_fwd_vs_our_base"] = four["seq_s"] / base["seq_s"]
    if hf:
        ratios["our_base_vs_hf_eager"] = base["seq_s"] / hf["seq_s"]
        ratios["lora_fwd_vs_hf_eager"] = lora_fwd["seq_s"] / hf["seq_s"]
    print_table(b.rows, ratios)
    with open(os.path.join(out, "engine_bench.json"), "w") as f:
        json.dump({"device": dev_name, "torch": torch.__version__, "config": {"hidden": b.h, "layers": b.L,
                   "batch": b.B, "seq": b.S, "dtype": str(b.dtype), "lora_tenants": b.n_lora},
                   "rows": b.rows, "ratios": ratios, "lora_into_gemm": getattr(b, "lora_into_gemm", None),
                   "varlen_attention": {"choice": b.choices["tuned_varlen"], "ms": b.choices["tuned_varlen_ms"]},
                   "lora_fused_choice_us": lora_choice(b)}, f, indent=1, default=str)
    print("png:", plot(b.rows, os.path.join(out, "engine_bench.png")))
    print("attention varlen path:", b.choices["tuned_varlen"], b.choices["tuned_varlen_ms"],
          "flash mode:", b.choices["tuned_flash_mode"])
    print("LoRA expand into GEMM:", getattr(b, "lora_into_gemm", None))
    print("LoRA fused kernel choice:", json.dumps(lora_choice(b), default=str))


if __name__ == "__main__":
    main()
