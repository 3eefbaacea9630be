"""`make faults` / `python -m scripts.faults [--short] [--only a,b] [--out DIR]`.

Drives the real system (local Kafka + PostgreSQL from scripts/services, a manager and >= 2
workers as processes) through every fault scenario and writes the reliability report:
report.md (table), report.json, and one PNG timeline per scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.faults import report  # noqa: E402
from scripts.faults.scenarios import SCENARIOS, Ctx  # noqa: E402
from workers.config import settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--short", action="store_true", help="CI form: shorter load, 1,000 poison records")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--out", default=str(Path(".flock") / "faults"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings()
    ctx = Ctx(s.database_url, s.kafka_bootstrap, args.short, out)
    rows = []
    for name in names:
        t = time.monotonic()
        print(f"[faults] {name} ...", flush=True)
        row = SCENARIOS[name](ctx)
        h = row.pop("_history", None)
        if h is not None:
            report.plot(name, h.timeline(), h.faults, h.t0, out)
        row["wall_s"] = round(time.monotonic() - t, 1)
        rows.append(row)
        print(f"[faults] {name}: lost={row['lost']} dup={row['duplicates']} replied={row['replied']}/"
              f"{row['acked']} dlq={row['dlq']} recovery={row['recovery_s']}s  {row['notes']}", flush=True)
    (out / "report.md").write_text(report.markdown(rows))
    (out / "report.json").write_text(json.dumps(rows, indent=2, default=str))
    print(report.markdown(rows))
    failed = [r["scenario"] for r in rows if r["lost"] or r.get("bounded") is False]
    if failed:
        print(f"[faults] FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
