"""Lower-layer skipping (issue 13): accuracy and speed of a skipping base.

Accuracy: all-MiniLM-L6-v2, K in --skips (default 2,3): the shallow part distilled on the BBC
News and tweet training texts (unlabelled), LoRA and Houlsby-adapter tenants trained on layers
>= K of the FULL model (the trainer, unchanged), then served from the same delta by the plain
base and by the skipping base: held-out accuracy of each, and the table's hit rate on held-out
text (share of held-out tri-gram occurrences already in the corpus table).
Speed: sequences/s of one batch (--tokens per batch, 32,768 by default, at every length 8..128)
of 8 LoRA tenants on layers >= K served by the plain base (all layers) and by the skipping base
(warm table: every window a hit; cold: every window a miss), and of a mixed batch (half its rows
from 8 tenants adapting every layer) on the skipping base, for MiniLM (K = 3) and a
BERT-base-shaped random model with K = 6. GPU seq/s come from the engine's compute-stream events
(forward with lookups and misses, heads, copy-out); wall seq/s add the host path of Engine.run.

    .venv/bin/python bench/plot.py --quick                                   # CPU smoke
    .venv/bin/python bench/train_quality.py --export-data /tmp/tq            # splits to carry
    python bench/plot.py --data-dir /tmp/tq --device cuda --out bench_out/   # GPU host, no network

Writes OUT/plot.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.train_quality import load_splits  # noqa: E402
from workers.engine.batch import PackedBatch, RequestItem, TenantDelta  # noqa: E402
from workers.engine.model_loading import load_base  # noqa: E402
from workers.engine.plot import build  # noqa: E402
from workers.engine.plot import trigrams as tg  # noqa: E402
from workers.engine.plot.shallow import ShallowWeights  # noqa: E402
from workers.engine.pool import PoolConfig  # noqa: E402
from workers.engine.runtime import Engine  # noqa: E402
from workers.engine.synthetic import random_delta, save_random_bert  # noqa: E402
from workers.engine.tokenize import BatchTokenizer  # noqa: E402
from workers.config import settings  # noqa: E402
from workers.models import resolve_model_dir  # noqa: E402
from workers.trainer.core import TrainSpec, load_examples, train  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PETS = {"lora": {"r": 8, "alpha": 16, "sites": ["q", "v"]}, "adapter": {"variant": "houlsby", "bottleneck": 64,
                                                                     "activation": "relu"}}


def _accuracy(engine: Engine, tok: BatchTokenizer, tid: str, rows: list[dict], bs: int = 64) -> float:
    right = 0
    for j in range(0, len(rows), bs):
        chunk = rows[j:j + bs]
        out = engine.run(tok.pack([RequestItem(tid, text=r["text"]) for r in chunk]))
        right += sum(out[i].label == r["label"] for i, r in enumerate(chunk))
    return right / len(rows)


def _keys_of(tok: BatchTokenizer, texts: list[str], vocab: int) -> torch.Tensor:
    b = tok.pack([RequestItem("x", text=t) for t in texts])
    cu = b.cu_seqlens
    lens = cu[1:] - cu[:-1]
    tok_seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    local = torch.arange(b.input_ids.numel()) - cu[tok_seq]
    hp, hn = tg.neighbours(cu, tok_seq, local)
    return tg.keys(tg.windows(b.input_ids, hp, hn), vocab)


def accuracy_side(args, work: Path) -> list[dict]:
    base_dir = str(resolve_model_dir(MODEL, settings().models_dir))
    data = {n: load_splits(n, args) for n in args.datasets}
    corpus = work / "corpus.txt"
    corpus.write_text("".join(r["text"].replace("\n", " ") + "\n" for n in data for r in data[n][0]))
    layers = load_base(base_dir).dims.layers
    results = []
    for K in args.skips:
        out = work / f"minilm-plot{K}"
        spec = build.DistilSpec(skip=K, epochs=args.distil_epochs, batch_size=32, max_length=args.max_length,
                                lr=args.distil_lr, max_steps=args.distil_steps, device=args.device, ckpt_every=500)
        t0 = time.perf_counter()
        summary = build.build_skipping_base(MODEL, base_dir, out, [str(corpus)], spec,
                                            lambda p, d, t, i: print(f"\r  K={K} {p} {d}/{t}", end="", flush=True))
        print(f"\n  K={K}: distilled {summary['steps']} steps in {time.perf_counter() - t0:.0f}s, loss "
              f"{summary['loss_first']} -> {summary['loss_last']}, table {summary['table_rows']} rows", flush=True)
        table_keys = torch.sort(build.load_file(str(out / "plot_table.safetensors"))["keys"]).values
        for name, (tr, te) in data.items():
            tok = BatchTokenizer(base_dir, args.max_length)
            hk = _keys_of(tok, [r["text"] for r in te], load_base(base_dir).word_emb.shape[0])
            hit = float(torch.isin(hk, table_keys).float().mean())
            for pet, pcfg in PETS.items():
                ts = TrainSpec(pet_type=pet, pet_config={**pcfg, "layers": list(range(K, layers))},
                               epochs=args.epochs, batch_size=32, max_length=args.max_length, device=args.device,
                               seed=args.seed, test_examples=load_examples(te))
                r = train(MODEL, load_examples(tr), ts)
                delta = TenantDelta("t", 1, pet, r.config, r.tensors)
                row = {"dataset": name, "skip": K, "pet": pet, "train_rows": len(tr), "test_rows": len(te),
                       "heldout_hit_rate": round(hit, 4), "trainer_test_accuracy": r.metrics["test"]["accuracy"]}
                for kind, d in (("full", base_dir), ("skip", str(out))):
                    eng = Engine(d, lambda t: delta, device=args.device, pool_config=PoolConfig(default_slots=4))
                    try:
                        row[f"acc_{kind}"] = round(_accuracy(eng, tok, "t", te), 4)
                        if kind == "skip":
                            assert eng.skips("t")
                    finally:
                        eng.close()
                row["loss_pts"] = round(100 * (row["acc_full"] - row["acc_skip"]), 2)
                results.append(row)
                print(f"  {name:6s} K={K} {pet:7s} full {row['acc_full']:.4f} skip {row['acc_skip']:.4f} "
                      f"({row['loss_pts']:+.2f} pts) held-out hit rate {hit:.3f}", flush=True)
    return results


def _time(engine: Engine, batch: PackedBatch, iters: int) -> tuple[float, float]:
    """(median wall seconds of Engine.run, median GPU seconds of its compute) per batch. The GPU
    time (compute-stream events: forward incl. table lookups and misses, heads, D2H) is what
    skipping layers saves; the wall time adds the host path (tokens in, plan, outputs)."""
    engine.run(batch)  # warm-up (and, on the skipping base, fills the table)
    walls, gpus = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = engine.run(batch)
        walls.append(time.perf_counter() - t0)
        gpus.append(out.timings.get("gpu_ms", walls[-1] * 1e3) / 1e3)  # CPU: no events, wall time
    return float(np.median(walls)), float(np.median(gpus))


def speed_side(args, work: Path, model: str, base_dir: str, K: int, tokens: int) -> list[dict]:
    """Plain vs skipping (warm and cold table) on one batch of upper-layer LoRA tenants."""
    base = load_base(base_dir)
    dims = base.dims
    out = work / f"speed-{model}-{K}"
    if not (out / "plot.safetensors").exists():  # speed only: an undistilled shallow part is as fast
        build.write_base(base_dir, out, ShallowWeights.init_from(base, K), {"base": model, "skip": K}, None)
    deltas = {}
    for j in range(8):
        d = random_delta(f"t{j}", "lora", dims, j)
        d.tensors = {n: t for n, t in d.tensors.items() if not n.startswith("layers.") or int(n.split(".")[1]) >= K}
        d.config["layers"] = list(range(K, dims.layers))
        deltas[d.tenant_id] = d
        full = random_delta(f"f{j}", "lora", dims, 100 + j)  # adapts every layer: never skips
        deltas[full.tenant_id] = full
    rows = []
    dev = args.device
    plain = Engine(base_dir, deltas.__getitem__, device=dev, pool_config=PoolConfig(default_slots=16))
    skip = Engine(str(out), deltas.__getitem__, device=dev, pool_config=PoolConfig(default_slots=16))
    try:
        for L in args.lengths:
            batch_seqs = max(8, tokens // L)  # the same token budget at every length
            tenants = [f"t{j % 8}" for j in range(batch_seqs)]
            half = [f"t{j % 8}" if j % 2 else f"f{j % 8}" for j in range(batch_seqs)]  # a mixed batch
            rng = np.random.default_rng(L)
            ids = torch.from_numpy(rng.integers(1000, base.word_emb.shape[0], size=batch_seqs * L))
            b = PackedBatch(ids, torch.arange(0, batch_seqs * L + 1, L), tenants)
            t_plain = _time(plain, b, args.iters)
            t_warm = _time(skip, b, args.iters)
            t_half = _time(skip, PackedBatch(ids, b.cu_seqlens, half), args.iters)
            # cold: a fresh random batch each call (every window a miss, computed and inserted)
            warm_stats = skip.plot_stats()
            cold = []
            for it in range(max(1, args.iters // 2)):
                ids2 = torch.from_numpy(rng.integers(1000, base.word_emb.shape[0], size=batch_seqs * L))
                b2 = PackedBatch(ids2, b.cu_seqlens, tenants)
                t0 = time.perf_counter()
                out = skip.run(b2)
                cold.append(out.timings.get("gpu_ms", (time.perf_counter() - t0) * 1e3) / 1e3)
            st = skip.plot_stats()
            t_cold = float(np.median(cold))
            row = {"model": model, "skip": K, "layers": dims.layers, "length": L, "batch": batch_seqs,
                   "gpu_seq_s_plain": round(batch_seqs / t_plain[1], 1),
                   "gpu_seq_s_skip_warm": round(batch_seqs / t_warm[1], 1),
                   "gpu_seq_s_skip_half": round(batch_seqs / t_half[1], 1),
                   "gpu_seq_s_skip_cold": round(batch_seqs / t_cold, 1),
                   "speedup_warm": round(t_plain[1] / t_warm[1], 3), "speedup_half": round(t_plain[1] / t_half[1], 3),
                   "speedup_cold": round(t_plain[1] / t_cold, 3),
                   "wall_seq_s_plain": round(batch_seqs / t_plain[0], 1),
                   "wall_seq_s_skip_warm": round(batch_seqs / t_warm[0], 1),
                   "wall_speedup_warm": round(t_plain[0] / t_warm[0], 3),
                   "table_rows_device": st["device_rows"], "table_bytes_device": st["device_bytes"],
                   "warm_lookup_ms": round(warm_stats["last_lookup_ms"], 3),
                   "cold_lookup_ms": round(st["last_lookup_ms"], 3), "cold_compute_ms": round(st["last_compute_ms"], 3)}
            rows.append(row)
            print(f"  {model:9s} K={K} L={L:3d} x{batch_seqs:5d}: GPU seq/s plain {row['gpu_seq_s_plain']:8.0f}, "
                  f"skip warm {row['speedup_warm']:.2f}x, half {row['speedup_half']:.2f}x, cold "
                  f"{row['speedup_cold']:.2f}x; wall warm {row['wall_speedup_warm']:.2f}x; lookup "
                  f"{row['warm_lookup_ms']:.2f} ms", flush=True)
    finally:
        plain.close()
        skip.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="bbc,tweets")
    ap.add_argument("--skips", default="2,3")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--distil-epochs", type=int, default=3)
    ap.add_argument("--distil-steps", type=int, default=None)
    ap.add_argument("--distil-lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lengths", default="8,16,32,64,128")
    ap.add_argument("--tokens", type=int, default=32768, help="Tokens per speed batch (sequences = tokens / length).")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", metavar="DIR", help="JSONL splits from bench/train_quality.py --export-data.")
    ap.add_argument("--work", help="Where the skipping bases go (default: a temporary directory).")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 300/150 rows, 1 epoch, 30 distil steps, "
                    "lengths 8,32,128, batch 16, BERT-base lengths 8,32.")
    ap.add_argument("--out", default=str(ROOT / "bench_out"), help="Directory for plot.json.")
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.epochs, args.distil_steps = 300, 150, 1, 30
        args.max_length, args.lengths, args.tokens, args.iters = 64, "8,32,128", 512, 3
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.skips = [int(k) for k in args.skips.split(",") if k]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    torch.manual_seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flock-plot-"))
    work.mkdir(parents=True, exist_ok=True)
    doc = {"args": {k: v for k, v in vars(args).items()}, "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    if not args.no_accuracy:
        print("accuracy (MiniLM, tenants trained on layers >= K of the full model):", flush=True)
        doc["accuracy"] = accuracy_side(SimpleNamespace(**vars(args)), work)
    if not args.no_speed:
        print("speed:", flush=True)
        minilm = str(resolve_model_dir(MODEL, settings().models_dir))
        doc["speed"] = speed_side(args, work, "minilm", minilm, 3, args.tokens)
        bb = work / "bert-base-random"
        if not (bb / "config.json").exists():
            save_random_bert(str(bb))
        if args.quick:
            args.lengths = [8, 32]
            args.tokens = 128
        doc["speed"] += speed_side(args, work, "bert-base", str(bb), 6, args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plot.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'plot.json'}")


if __name__ == "__main__":
    main()
