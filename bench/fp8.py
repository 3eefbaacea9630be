"""FP8 base (issue 14 item 3): accuracy of real tenants on an FP8 all-MiniLM-L6-v2 vs the bf16 base.

LoRA (q,v r8) and Houlsby-adapter tenants are trained (the trainer, unchanged, fp32) for BBC News
topics and tweet sentiment; the FP8 base is calibrated on the datasets' training texts (unlabelled,
``build_fp8_base``); each tenant's held-out accuracy is measured on the bf16 base and on the FP8
base, same deltas, same engine path. Speed on the BERT-base shape is a row of bench/engine.py.

    .venv/bin/python bench/fp8.py --quick                                   # CPU smoke (emulated FP8)
    python bench/fp8.py --data-dir /tmp/tq --device cuda --out bench_out/   # GPU host, no network

Writes OUT/fp8.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.plot import PETS, _accuracy  # noqa: E402
from bench.train_quality import load_splits  # noqa: E402
from workers.config import settings  # noqa: E402
from workers.engine.batch import TenantDelta  # noqa: E402
from workers.engine.fp8 import build_fp8_base  # noqa: E402
from workers.engine.pool import PoolConfig  # noqa: E402
from workers.engine.runtime import Engine  # noqa: E402
from workers.engine.tokenize import BatchTokenizer  # noqa: E402
from workers.models import resolve_model_dir  # noqa: E402
from workers.trainer.core import TrainSpec, load_examples, train  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="bbc,tweets")
    ap.add_argument("--pets", default="lora,adapter")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--calib-texts", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", metavar="DIR", help="JSONL splits from bench/train_quality.py --export-data.")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 300/150 rows, 1 epoch, LoRA only.")
    ap.add_argument("--out", default=str(ROOT / "bench_out"))
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.epochs, args.max_length, args.pets = 300, 150, 1, 64, "lora"
    datasets = [d for d in args.datasets.split(",") if d]
    pets = [p for p in args.pets.split(",") if p]
    base_dir = str(resolve_model_dir(MODEL, settings().models_dir))
    data = {n: load_splits(n, args) for n in datasets}
    work = Path(tempfile.mkdtemp(prefix="flock-fp8-"))
    corpus = work / "corpus.txt"
    corpus.write_text("".join(r["text"].replace("\n", " ") + "\n" for n in data for r in data[n][0]))
    t0 = time.perf_counter()
    fp8_dir = work / "minilm-fp8"
    summary = build_fp8_base(MODEL, base_dir, fp8_dir, [str(corpus)], args.calib_texts, args.max_length,
                             64, args.device)
    print(f"calibrated on {summary['texts']} texts in {time.perf_counter() - t0:.1f}s "
          f"(amax {summary['amax_min']}..{summary['amax_max']})", flush=True)
    tok = BatchTokenizer(base_dir, args.max_length)
    rows = []
    for name, (tr, te) in data.items():
        for pet in pets:
            ts = TrainSpec(pet_type=pet, pet_config=dict(PETS[pet]), epochs=args.epochs, batch_size=32,
                           max_length=args.max_length, device=args.device, seed=args.seed,
                           test_examples=load_examples(te))
            r = train(MODEL, load_examples(tr), ts)
            delta = TenantDelta("t", 1, pet, r.config, r.tensors)
            row = {"dataset": name, "pet": pet, "train_rows": len(tr), "test_rows": len(te),
                   "trainer_test_accuracy": r.metrics["test"]["accuracy"]}
            for kind, d in (("bf16", base_dir), ("fp8", str(fp8_dir))):
                eng = Engine(d, lambda t: delta, device=args.device, pool_config=PoolConfig(default_slots=4))
                try:
                    row[f"acc_{kind}"] = round(_accuracy(eng, tok, "t", te), 4)
                    if kind == "fp8":
                        row["fp8_gemm"] = eng.tuned_choices()["fp8_base"]
                finally:
                    eng.close()
            row["loss_pts"] = round(100 * (row["acc_bf16"] - row["acc_fp8"]), 2)
            rows.append(row)
            print(f"  {name:6s} {pet:7s} bf16 {row['acc_bf16']:.4f} fp8 {row['acc_fp8']:.4f} "
                  f"({row['loss_pts']:+.2f} pts, {row['fp8_gemm']})", flush=True)
    print("\n| dataset | PET | bf16 base | FP8 base | loss (pts) |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['pet']} | {r['acc_bf16']:.4f} | {r['acc_fp8']:.4f} | {r['loss_pts']:+.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
           "args": vars(args), "calibration": summary, "rows": rows}
    (out / "fp8.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'fp8.json'}")


if __name__ == "__main__":
    main()
