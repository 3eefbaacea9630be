"""Control-plane benchmark (not a test): Zipf-skewed tenant load over N CPU workers, static hash
assignment (contiguous partition ranges from FLOCK_PARTITIONS) vs manager leases with
rebalancing and hot-tenant routing, in the same run, on the real local Kafka + PostgreSQL.

Each worker is pinned to its own CPU core with one torch thread, so that it has a fixed capacity
like a GPU (otherwise an overloaded worker simply borrows the idle worker's core). Both modes
see the same tenants, distribution, rate and durations: a warm-up (the manager measures and
rebalances during it; the static mode just serves), then a measured open-loop phase.

    python bench/balance.py --workers 2 --rate 230 --warmup 30 --seconds 40
Prints a table and writes $OUT/balance_bench.json (OUT defaults to ./bench_out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.serving_harness import ROOT, WorkerProcess, make_tenants, make_topics  # noqa: E402
from workers import migrate  # noqa: E402
from workers.client import FlockClient  # noqa: E402
from workers.config import settings  # noqa: E402
from workers.db import session_factory  # noqa: E402
from workers.kafka_admin import ensure_topics  # noqa: E402
from workers.loadgen import run_load  # noqa: E402

CONTROL = {"FLOCK_HEARTBEAT_S": "1", "FLOCK_LEASE_POLL_S": "0.25", "FLOCK_LEASE_TIMEOUT_S": "6",
           "FLOCK_WORKER_TIMEOUT_S": "6", "FLOCK_RATE_WINDOW_S": "6", "FLOCK_MANAGER_TICK_S": "0.5",
           "FLOCK_REBALANCE_MIN_DWELL_S": "8", "FLOCK_REBALANCE_COOLDOWN_S": "8", "FLOCK_REBALANCE_THRESHOLD": "1.15",
           "FLOCK_REBALANCE_TARGET": "1.05"}
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLOCK_DEVICE": "cpu", "FLOCK_HTTP_PORT": "0"}


def pin(pid: int, core: int) -> None:
    """Every thread of the process onto one core (threads started later inherit it)."""
    subprocess.run(["taskset", "-a", "-cp", str(core), str(pid)], check=True, capture_output=True)


def ranges(n_partitions: int, n_workers: int) -> list[str]:
    per = n_partitions // n_workers
    out = []
    for i in range(n_workers):
        hi = n_partitions - 1 if i == n_workers - 1 else (i + 1) * per - 1
        out.append(f"{i * per}-{hi}")
    return out


def start_workers(db: str, topics, tag: str, n: int, extra: list[dict]) -> list[WorkerProcess]:
    ws = []
    for i in range(n):
        w = WorkerProcess(db, topics, tag, **ONE_CORE, **extra[i])
        w.port = 0
        w.env["FLOCK_HTTP_PORT"] = "0"
        ws.append(w)
    for i, w in enumerate(ws):
        log = open(w.log_path, "a")
        w.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "run"], env=w.env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    # Ready = consuming (the log says so); no HTTP port so that many can run side by side.
    deadline = time.time() + 300
    for i, w in enumerate(ws):
        while "consuming" not in w.log_tail(100000):
            if w.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"worker failed to start: {w.log_tail()}")
            time.sleep(0.3)
        pin(w.proc.pid, i % os.cpu_count())
    return ws


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def drive(bootstrap: str, topics, routing: str, tenants: list[str], args, seconds: float, seed: int) -> dict:
    async with FlockClient(bootstrap, requests_topic=topics.requests, reply_topic=topics.replies,
                           routing_topic=routing) as c:
        rep = await run_load(c, tenants, rate=args.rate, count=int(args.rate * seconds), dist="zipf",
                             zipf_s=args.zipf, min_words=args.min_words, max_words=args.max_words,
                             timeout=args.timeout, seed=seed)
    return rep.summary()


def run_mode(mode: str, args, db: str, tenants: list[str], tag: str) -> dict:
    s = settings()
    mtag = f"{tag}{mode[0]}"
    topics = asyncio.run(make_topics(s.kafka_bootstrap, mtag, partitions=args.partitions))
    routing = f"routing.{mtag}"
    asyncio.run(ensure_topics(s.kafka_bootstrap, {routing: (1, {"cleanup.policy": "compact"})}))
    common = {**CONTROL, "FLOCK_ROUTING_TOPIC": routing}
    if mode == "static":
        extra = [{**common, "FLOCK_PARTITIONS": r} for r in ranges(args.partitions, args.workers)]
    else:
        extra = [{**common, "FLOCK_PARTITIONS": "leases"} for _ in range(args.workers)]
    ws = start_workers(db, topics, mtag, args.workers, extra)
    procs = [w.proc for w in ws]
    try:
        if mode == "managed":
            env = {**os.environ, **topics.env(), **common, "FLOCK_DATABASE_URL": db,
                   "FLOCK_CONSUMER_GROUP": f"grp-{mtag}"}
            log = open(ROOT / ".flock" / "logs" / f"bench-manager-{mtag}.log", "a")
            procs.append(subprocess.Popen([sys.executable, "-m", "workers.cli", "manager"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            time.sleep(3)  # leases placed
        t0 = time.time()
        warm = asyncio.run(drive(s.kafka_bootstrap, topics, routing, tenants, args, args.warmup, seed=1))
        measured = asyncio.run(drive(s.kafka_bootstrap, topics, routing, tenants, args, args.seconds, seed=2))
        moves = 0
        if mode == "managed":
            from sqlalchemy import text
            with session_factory(db)() as sess:
                moves = sess.execute(text("SELECT count(*) FROM audit_events WHERE kind = 'lease.balance' "
                                          "AND subject LIKE :t AND at >= to_timestamp(:t0)"),
                                     {"t": f"{topics.requests}/%", "t0": t0}).scalar()
                routes = sess.execute(text("SELECT count(*) FROM tenant_routes WHERE tenant_id LIKE :p"),
                                      {"p": "bench-%"}).scalar()
        else:
            routes = 0
        return {"mode": mode, "warmup": warm, "measured": measured, "moves": moves, "spread_tenants": routes}
    finally:
        stop(procs)


def ensure_tenants(db: str, n: int) -> list[str]:
    from schema.tables import Tenant
    names = [f"bench-{i}" for i in range(n)]
    with session_factory(db)() as s:
        have = {t for (t,) in s.query(Tenant.tenant_id).filter(Tenant.tenant_id.in_(names))}
    if len(have) < n:
        if have:
            raise SystemExit(f"some bench tenants exist, some not: delete them (flockserve tenant delete) and rerun")
        make_tenants(session_factory(db), "bench", n)
    return names


def static_imbalance(tenants: list[str], args) -> dict:
    """What static ranges give under the generator's Zipf weights (tenant i has weight 1/(i+1)^s)."""
    from schema.topics import partition_for
    w = [1 / (i + 1) ** args.zipf for i in range(len(tenants))]
    part = [0.0] * args.partitions
    for t, x in zip(tenants, w):
        part[partition_for(t, args.partitions)] += x / sum(w)
    shares = []
    for r in ranges(args.partitions, args.workers):
        lo, hi = map(int, r.split("-"))
        shares.append(round(sum(part[lo:hi + 1]), 3))
    return {"shares": shares, "imbalance": round(max(shares) * args.workers, 3),
            "top_partition_share": round(max(part), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--tenants", type=int, default=48)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--rate", type=float, default=230.0, help="requests/s offered (open loop)")
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--min-words", type=int, default=4)
    ap.add_argument("--max-words", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--modes", default="static,managed")
    args = ap.parse_args()

    db = settings().database_url
    migrate.upgrade("head", db)
    # Fixed tenant names, so the tenant -> partition hash (and thus static imbalance) is reproducible.
    tenants = ensure_tenants(db, args.tenants)
    static = static_imbalance(tenants, args)
    tag = f"bb{int(time.time()) % 10**7}"
    results = [run_mode(m, args, db, tenants, tag) for m in args.modes.split(",")]

    print(f"\n{args.workers} workers (1 core each), {args.partitions} partitions, {args.tenants} tenants Zipf s={args.zipf}, "
          f"{args.rate:.0f} req/s offered, {args.seconds:.0f}s measured after {args.warmup:.0f}s warm-up")
    print(f"static hash assignment: predicted worker load shares {static['shares']}, "
          f"imbalance (max/mean) {static['imbalance']}; largest partition {static['top_partition_share']} of load")
    print(f"{'mode':<8} {'throughput_rps':>14} {'p50_ms':>8} {'p99_ms':>9} {'timeouts':>8} {'moves':>5} {'spread':>6}")
    for r in results:
        m = r["measured"]
        print(f"{r['mode']:<8} {m['throughput_rps']:>14} {m['p50_ms']:>8} {m['p99_ms']:>9} {m['timeouts']:>8} "
              f"{r['moves']:>5} {r['spread_tenants']:>6}")
    if len(results) == 2:
        a, b = results[0]["measured"], results[1]["measured"]
        print(f"managed/static throughput {b['throughput_rps'] / max(a['throughput_rps'], 1e-9):.2f}x, "
              f"p99 {a['p99_ms'] / max(b['p99_ms'], 1e-9):.1f}x lower")
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "balance_bench.json").write_text(json.dumps({"args": vars(args), "static_prediction": static,
                                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
