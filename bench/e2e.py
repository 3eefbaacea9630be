"""End-to-end throughput and latency through Kafka vs the engine alone, in the same run.

    .venv/bin/python bench/e2e.py [--requests 1500] [--tenants 60]

Needs the local services (scripts/services up) and a migrated database. Creates its own tenants
(prefix bench-<ts>) and topics, then measures on this machine (CPU unless FLOCK_DEVICE says
otherwise):
  1. engine only: tokenise + pack + Engine.run in-process, batches as the worker forms them;
  2. end to end, saturated: all requests produced at once, a `flockserve worker run` process
     answers; throughput = requests / (first send -> last reply);
  3. end to end, latency: open-loop at 60 % of the engine-only rate; p50/p99 per request.
Prints a table and writes bench_out/e2e.json (or $OUT/e2e.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from schema.messages import InferRequest  # noqa: E402
from tests.serving_harness import WorkerProcess, collect, make_tenants, make_topics, produce  # noqa: E402
from workers.config import settings  # noqa: E402
from workers.loadgen import WORDS  # noqa: E402

BASE = "sentence-transformers/all-MiniLM-L6-v2"


def texts(n: int, seed: int = 0) -> list[str]:
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48))) for _ in range(n)]


def engine_only(tenants: list[str], items: list[tuple[str, str]], max_seqs: int) -> dict:
    from workers.adapters.store import AdapterStore, make_backend
    from workers.db import session_factory
    from workers.engine.batch import RequestItem
    from workers.engine.runtime import Engine
    from workers.engine.tokenize import BatchTokenizer
    from workers.models import resolve_model_dir
    from workers.serving.adapter_source import StoreLoader

    model_dir = str(resolve_model_dir(BASE))
    store = AdapterStore(session_factory(), make_backend("postgres", None))
    device = None if settings().device == "auto" else settings().device
    engine = Engine(model_dir, StoreLoader(store, BASE), device=device)
    tok = BatchTokenizer(model_dir)
    try:
        warm = [RequestItem(t, text=x) for t, x in items[:max_seqs]]
        engine.run(tok.pack(warm))  # loads every adapter once, as a warm worker has them
        engine.prefetch(tenants).result()
        t0 = time.perf_counter()
        futures = []
        for i in range(0, len(items), max_seqs):
            chunk = [RequestItem(t, text=x) for t, x in items[i:i + max_seqs]]
            futures.append(engine.submit(tok.pack(chunk)))
        for f in futures:
            f.result()
        dt = time.perf_counter() - t0
    finally:
        engine.close()
    return {"requests": len(items), "seconds": dt, "rps": len(items) / dt}


async def e2e_saturated(bootstrap: str, topics, items) -> dict:
    reqs = [InferRequest(tenant_id=t, text=x) for t, x in items]
    t0 = time.monotonic()
    await produce(bootstrap, topics.requests, reqs)
    want = {r.request_id for r in reqs}
    replies = await collect(bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs}, timeout=900)
    dt = time.monotonic() - t0
    ok = sum(1 for r in replies if r.request_id in want and r.ok)
    return {"requests": len(reqs), "ok": ok, "seconds": dt, "rps": len(reqs) / dt}


async def e2e_latency(topics, items, rate: float) -> dict:
    from workers.client import FlockClient
    from workers.loadgen import LoadReport
    report = LoadReport()
    async with FlockClient(requests_topic=topics.requests, reply_topic=topics.replies) as client:
        start = time.monotonic()
        waits = []
        for i, (t, x) in enumerate(items):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t_send = time.monotonic()
            fut = await client.submit(client.request(t, x, timeout=300))

            async def done(f=fut, ts=t_send):
                await f
                report.latencies_ms.append((time.monotonic() - ts) * 1000)
            waits.append(asyncio.create_task(done()))
        await asyncio.gather(*waits)
        report.duration_s = time.monotonic() - start
    return {"rate": rate, "requests": len(items), "p50_ms": report.percentile(50),
            "p99_ms": report.percentile(99), "achieved_rps": len(items) / report.duration_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--tenants", type=int, default=60)
    ap.add_argument("--max-seqs", type=int, default=64)
    args = ap.parse_args()
    s = settings()
    tag = f"bench-{int(time.time())}"
    from workers.db import session_factory
    tenants = make_tenants(session_factory(), tag, args.tenants)
    xs = texts(args.requests)
    items = [(tenants[i % len(tenants)], xs[i]) for i in range(args.requests)]
    print(f"[e2e] {args.requests} requests over {len(tenants)} tenants; engine only ...", flush=True)
    eng = engine_only(tenants, items, args.max_seqs)
    topics = asyncio.run(make_topics(s.kafka_bootstrap, tag, partitions=4))
    worker = WorkerProcess(s.database_url, topics, tag, FLOCK_BATCH_MAX_SEQS=str(args.max_seqs),
                           FLOCK_BATCH_MAX_TOKENS="16384", FLOCK_DEVICE=s.device if s.device != "auto" else "cpu")
    worker.start()
    try:
        print("[e2e] end to end, saturated ...", flush=True)
        # Warm the worker's adapter pool the same way the engine-only run was warmed.
        asyncio.run(e2e_saturated(s.kafka_bootstrap, topics, items[: len(tenants) * 2]))
        sat = asyncio.run(e2e_saturated(s.kafka_bootstrap, topics, items))
        print("[e2e] end to end, latency at 60 % of engine-only rate ...", flush=True)
        lat = asyncio.run(e2e_latency(topics, items[: min(len(items), 600)], 0.6 * eng["rps"]))
    finally:
        worker.terminate()
    ratio = sat["rps"] / eng["rps"]
    rows = [("engine only (in-process)", f"{eng['rps']:.1f}", "-", "-"),
            ("end to end via Kafka, saturated", f"{sat['rps']:.1f}", "-", "-"),
            (f"end to end, open loop {lat['rate']:.0f} req/s", f"{lat['achieved_rps']:.1f}",
             f"{lat['p50_ms']:.0f}", f"{lat['p99_ms']:.0f}")]
    print(f"\n{'run':42s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in rows:
        print(f"{r[0]:42s} {r[1]:>8s} {r[2]:>8s} {r[3]:>8s}")
    print(f"\nend-to-end / engine-only throughput: {ratio:.3f}x (target >= 0.9x)")
    out_dir = Path(os.environ.get("OUT", ROOT / "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "e2e.json").write_text(json.dumps({"engine_only": eng, "e2e_saturated": sat, "e2e_latency": lat,
                                                  "ratio": ratio, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
