"""Bulk registration at scale: N small LoRA tenants through `import_many`, the rate, the
database size, and what paging costs with N tenants registered.

    .venv/bin/python bench/register.py --tenants 100000            # needs scripts/services up
    .venv/bin/python bench/register.py --tenants 2000 --json out.json

Adapters are generated once under --src (a directory per tenant, Flock-native form: rank-2 LoRA
on one layer's query of all-MiniLM-L6-v2 plus a 2-label head, ~9 KB each) and registered into a
fresh database (dropped afterwards unless --keep). Nothing here is timed in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from schema.layout import expected_tensors  # noqa: E402
from workers import migrate  # noqa: E402
from workers.adapters.bulk import import_many, read_source  # noqa: E402
from workers.adapters.store import AdapterStore, make_backend  # noqa: E402
from workers.config import settings, sync_database_url  # noqa: E402
from workers.db import session_factory  # noqa: E402
from workers.models import base_dims  # noqa: E402
from workers.tenants import TenantRegistry  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LORA = {"r": 2, "alpha": 4, "sites": ["q"], "layers": [5], "task": "seq_cls", "labels": ["a", "b"], "pooling": "mean"}


def generate(src: Path, n: int) -> None:
    import torch
    from safetensors.torch import save_file
    have = sum(1 for _ in src.iterdir()) if src.is_dir() else 0
    if have >= n:
        return
    specs = expected_tensors("lora", LORA, base_dims(MODEL))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(have, n):
        d = src / f"t{i:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "flock_adapter.json").write_text(json.dumps({"pet_type": "lora", "config": LORA}))
        save_file({s.name: torch.randn(s.shape, generator=g) * 0.02 for s in specs}, str(d / "adapter.safetensors"))
        if (i + 1) % 10000 == 0:
            print(f"[register] generated {i + 1}/{n} adapter directories ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--src", type=Path, default=ROOT / ".flock" / "bench-register")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the database (name printed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    generate(args.src, args.tenants)
    items = read_source(args.src)[:args.tenants]
    admin_url = make_url(sync_database_url(settings().database_url))
    name = f"flock_register_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade("head", url)
        sessions = session_factory(url)
        store = AdapterStore(sessions, make_backend("postgres", Path("/nonexistent")))
        done = [0]
        t0 = time.perf_counter()

        def progress(k: int) -> None:
            done[0] += k
            if done[0] % 10000 == 0:
                el = time.perf_counter() - t0
                print(f"[register] {done[0]}/{len(items)} tenants, {done[0] / el:,.0f}/s", flush=True)

        report = import_many(store, items, default_base_model=MODEL, batch_size=args.batch, progress=progress)
        again = import_many(store, items[:5000], default_base_model=MODEL, batch_size=args.batch)
        with sessions() as s:
            sizes = {t: s.scalar(text(f"select pg_total_relation_size('{t}')"))
                     for t in ("tenants", "adapters", "adapter_blobs")}
            db_bytes = s.scalar(text("select pg_database_size(current_database())"))
        reg = TenantRegistry(sessions)
        t1 = time.perf_counter()
        page = reg.page(limit=100, after=items[len(items) // 2].tenant_id)
        page_ms = (time.perf_counter() - t1) * 1e3
        t1 = time.perf_counter()
        n = reg.count()
        count_ms = (time.perf_counter() - t1) * 1e3
        result = {"tenants": len(items), "imported": report.imported, "refused": len(report.refused),
                  "seconds": round(report.seconds, 1), "rate_per_s": round(report.rate, 1),
                  "rerun_5000_unchanged": again.unchanged, "rerun_rate_per_s": round(again.rate, 1),
                  "table_bytes": sizes, "database_bytes": db_bytes, "page_100_ms": round(page_ms, 2),
                  "count_ms": round(count_ms, 2), "count": n, "page_rows": len(page.tenants), "batch": args.batch}
        print(f"\n{'tenants':<28}{len(items):>14,}\n{'registered (s)':<28}{report.seconds:>14,.1f}\n"
              f"{'rate (tenants/s)':<28}{report.rate:>14,.0f}\n{'re-run, unchanged (/s)':<28}{again.rate:>14,.0f}\n"
              f"{'database size (MiB)':<28}{db_bytes / 2**20:>14,.1f}\n"
              + "".join(f"{'  ' + t + ' (MiB)':<28}{b / 2**20:>14,.1f}\n" for t, b in sizes.items())
              + f"{'one page of 100 (ms)':<28}{page_ms:>14,.1f}\n{'count (ms)':<28}{count_ms:>14,.1f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            print(f"[register] kept database {name}")


if __name__ == "__main__":
    main()
