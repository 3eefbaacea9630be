"""Host-only engine micro-benchmark (CPU, no GPU needed): µs of host CPU per request for the work
that surrounds the forward pass — pack (token ids -> PackedBatch), adapter acquire, plan build,
heads + result copy, output objects, and materialising the per-request reply ``outputs`` the way
the worker does (``workers.serving.replies.outputs_of``). The forward itself is stubbed (random
hidden states), so the numbers are the host cost the GPU would have to hide. Times are CPU time
(process time for pack/submit/materialise, thread time for the acquire/plan/finish breakdown), median
over batches, so a loaded machine inflates them less than wall time would.

    python bench/engine_host.py                        # 10,000 LoRA tenants, lengths 8-128
    python bench/engine_host.py --tenants 2000 --batches 6
Writes $OUT/engine_host.json (OUT defaults to ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schema.layout import BaseDims  # noqa: E402
from workers.engine import runtime as rt  # noqa: E402
from workers.engine.batch import RequestItem  # noqa: E402
from workers.engine.pool import PoolConfig  # noqa: E402
from workers.engine.synthetic import random_delta, save_random_bert  # noqa: E402
from workers.engine.tokenize import BatchTokenizer  # noqa: E402
from workers.serving.replies import outputs_of  # noqa: E402


class _Timer:
    """Wrap a callable and add its wall time (s) to ``acc[name]``."""

    def __init__(self, acc, name, fn):
        self.acc, self.name, self.fn = acc, name, fn

    def __call__(self, *a, **kw):
        t = time.thread_time()  # CPU time of the calling thread: robust on a loaded machine
        try:
            return self.fn(*a, **kw)
        finally:
            self.acc[self.name] = self.acc.get(self.name, 0.0) + time.thread_time() - t


def realistic_lengths(rng, budget, lo=8, hi=128):
    ls, tot = [], 0
    while True:
        n = int(np.clip(rng.lognormal(np.log(40), 0.6), lo, hi))
        if tot + n > budget:
            return ls
        ls.append(n)
        tot += n


def run(args) -> dict:
    torch.set_num_threads(1)
    h, L = 32, 1
    dims = BaseDims(h, 64, L, 2)
    path = save_random_bert(tempfile.mkdtemp(), h, L, 2, 64, vocab=1000, max_pos=160)
    rng = np.random.default_rng(0)
    token_share = args.token_cls
    base = {}

    def loader(tid):
        i = int(tid.split("-")[1])
        nl = 2 if not args.mixed_labels else 2 + i % 7
        task = "token_cls" if (i % 100) < token_share * 100 else "seq_cls"
        key = (nl, task)
        if key not in base:
            base[key] = random_delta(tid, "lora", dims, seed=nl, n_labels=nl, task=task)
        d = base[key]
        return type(d)(tid, 1, d.pet_type, d.config, d.tensors)

    cfg = PoolConfig(device_bytes=4 << 30, host_bytes=4 << 30, default_slots=args.tenants + 64,
                     slots={"lora:r8:q,v": args.tenants + 64})
    eng = rt.Engine(path, loader, device="cpu", dtype=torch.float32, pool_config=cfg, max_inflight=1)
    tok = BatchTokenizer.__new__(BatchTokenizer)  # token ids only: no tokenizer files needed
    tok.tok, tok.max_length = None, 512
    try:
        t0 = time.perf_counter()
        n_ok = eng.prefetch([f"t-{i}" for i in range(args.tenants)]).result()
        print(f"prefetched {n_ok} tenants in {time.perf_counter() - t0:.1f} s", flush=True)
        T_max = args.seqs_budget * 128
        stub = torch.randn(T_max, h)
        fwd_s = {}
        real_forward = eng.encoder.forward

        def fake_forward(plan):
            t = time.perf_counter()
            out = stub[:plan.num_tokens]
            fwd_s["forward"] = fwd_s.get("forward", 0.0) + time.perf_counter() - t
            return out
        eng.encoder.forward = fake_forward
        acc: dict[str, float] = {}
        eng.pool.acquire = _Timer(acc, "acquire", eng.pool.acquire)
        rt.build_plan = _Timer(acc, "plan", rt.build_plan)
        eng._finish = _Timer(acc, "finish (completer)", eng._finish)

        batches = []
        for j in range(args.batches + 1):
            ls = realistic_lengths(rng, args.seqs_budget * 128 // 3 if False else int(args.tokens))
            tids = [f"t-{int(x)}" for x in rng.integers(0, args.tenants, size=len(ls))]
            items = [RequestItem(t, token_ids=rng.integers(1, 1000, size=n).tolist(), request_id=f"r{j}-{k}")
                     for k, (t, n) in enumerate(zip(tids, ls))]
            batches.append(items)
        per = {k: [] for k in ("pack", "submit", "materialise", "acquire", "plan", "finish (completer)")}
        n_req = []
        for j, items in enumerate(batches):
            acc.clear()
            # process CPU time (all threads: caller, launcher, completer); the caller only waits
            t = time.process_time()
            pb = tok.pack(items)
            t_pack = time.process_time() - t
            t = time.process_time()
            outs = eng.submit(pb).result()
            t_sub = time.process_time() - t
            t = time.process_time()
            reps = []
            for i in range(len(items)):
                o = outs[i]
                reps.append(outputs_of(o) if o.error is None else None)
            t_mat = time.process_time() - t
            assert all(r is not None for r in reps)
            if j == 0:
                continue  # warm-up
            n = len(items)
            n_req.append(n)
            per["pack"].append(t_pack / n)
            per["submit"].append(t_sub / n)
            per["materialise"].append(t_mat / n)
            for k in ("acquire", "plan", "finish (completer)"):
                per[k].append(acc.get(k, 0.0) / n)
        eng.encoder.forward = real_forward
    finally:
        eng.close()
    us = {k: statistics.median(v) * 1e6 for k, v in per.items()}
    us["engine host (submit + materialise)"] = us["submit"] + us["materialise"]
    us["all (pack + submit + materialise)"] = us["pack"] + us["engine host (submit + materialise)"]
    return {"tenants": args.tenants, "seqs_per_batch": float(np.mean(n_req)), "batches": len(n_req),
            "token_cls_share": token_share, "mixed_labels": args.mixed_labels, "us_per_request": us}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512 * 128, help="token budget per batch (lengths 8-128)")
    ap.add_argument("--seqs-budget", type=int, default=2048)
    ap.add_argument("--token-cls", type=float, default=0.0, help="share of token_cls tenants")
    ap.add_argument("--mixed-labels", action="store_true", help="2..8 labels per tenant (default: 2)")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    res = run(args)
    res["label"] = args.label
    print(f"\n{res['seqs_per_batch']:.0f} seqs/batch, {res['tenants']} tenants, token_cls share {res['token_cls_share']}, "
          f"mixed labels {res['mixed_labels']}  ({args.label})")
    print("| stage | µs / request |\n|---|---:|")
    for k, v in res["us_per_request"].items():
        print(f"| {k} | {v:.2f} |")
    out = os.environ.get("OUT", "./bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "engine_host.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
