"""Control-plane benchmark (not a test): Zipf-skewed tenant load over N workers, static hash
assignment (contiguous partition ranges) vs manager leases with rebalancing and hot-tenant
routing, in the same run, on the real Kafka + PostgreSQL (FLOCK_KAFKA_BOOTSTRAP/DATABASE_URL).

--device cpu: N CPU workers, each pinned to its own core with one torch thread, so that it has a
fixed capacity like a GPU (otherwise an overloaded worker simply borrows the idle worker's core).
--device cuda: one worker per GPU, started as on a production host by one supervised
`flockserve worker run --gpus GPUS` (each worker measures and registers its capacity); 10,000
tenants by default. Both modes see the same tenants, distribution, rate and durations: a warm-up
(the manager measures and rebalances during it; the static mode just serves), then a measured
open-loop phase. With --load 0.7,0.8,0.9 the offered rate is those fractions of the host's
capacity, measured first (uniform tenants, offered --probe-rate, managed system: replies/s).

    python bench/balance.py --workers 2 --rate 230 --warmup 30 --seconds 40     # CPU, fixed rate
    python bench/balance.py --quick                                             # CPU, ~2 minutes
    python bench/balance.py --device cuda --gpus all --load 0.7,0.8,0.9         # a multi-GPU host
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
from workers.serving.supervisor import select_gpus, split_static, visible_gpus  # noqa: E402

CONTROL = {"FLOCK_HEARTBEAT_S": "1", "FLOCK_LEASE_POLL_S": "0.25", "FLOCK_LEASE_TIMEOUT_S": "6",
           "FLOCK_WORKER_TIMEOUT_S": "6", "FLOCK_RATE_WINDOW_S": "6", "FLOCK_MANAGER_TICK_S": "0.5",
           "FLOCK_REBALANCE_MIN_DWELL_S": "8", "FLOCK_REBALANCE_COOLDOWN_S": "8", "FLOCK_REBALANCE_THRESHOLD": "1.15",
           "FLOCK_REBALANCE_TARGET": "1.05"}
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLOCK_DEVICE": "cpu", "FLOCK_HTTP_PORT": "0"}


def pin(pid: int, core: int) -> None:
    """Every thread of the process onto one core (threads started later inherit it)."""
    subprocess.run(["taskset", "-a", "-cp", str(core), str(pid)], check=True, capture_output=True)


def ranges(n_partitions: int, n_workers: int) -> list[list[int]]:
    """The static assignment: the supervisor's split for --gpus, the same for pinned CPU workers."""
    return split_static(list(range(n_partitions)), n_workers)


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


def start_gpu_workers(db: str, topics, tag: str, n: int, gpus: str, extra: dict) -> subprocess.Popen:
    """One `flockserve worker run --gpus` (it splits static partitions itself); ready when each
    of its n workers logs that it consumes."""
    env = {**os.environ, **topics.env(), **extra, "FLOCK_DATABASE_URL": db, "FLOCK_CONSUMER_GROUP": f"grp-{tag}",
           "FLOCK_WORKER_ID": f"bench-{tag}", "FLOCK_HTTP_PORT": "0",
           # every tenant's adapter fits its bank: the comparison is of placement, not of misses
           "FLOCK_ADAPTER_SLOTS": os.environ.get("FLOCK_ADAPTER_SLOTS", "2048")}
    log_path = ROOT / ".flock" / "logs" / f"bench-gpus-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "run", "--gpus", gpus], env=env,
                            stdout=open(log_path, "a"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while sum(" consuming " in ln for ln in log_path.read_text().splitlines()) < n:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"GPU workers failed to start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def drive(bootstrap: str, topics, routing: str, tenants: list[str], args, seconds: float, seed: int,
                rate: float, dist: str = "zipf", timeout: float | None = None) -> dict:
    async with FlockClient(bootstrap, requests_topic=topics.requests, reply_topic=topics.replies,
                           routing_topic=routing) as c:
        rep = await run_load(c, tenants, rate=rate, count=int(rate * seconds), dist=dist,
                             zipf_s=args.zipf, min_words=args.min_words, max_words=args.max_words,
                             timeout=timeout or args.timeout, seed=seed)
    return rep.summary()


def run_mode(mode: str, args, db: str, tenants: list[str], tag: str, rate: float, probe: bool = False) -> dict:
    """One system (fresh topics, workers, manager if managed) under one load; the measured phase."""
    s = settings()
    mtag = f"{tag}{'p' if probe else mode[0]}"
    topics = asyncio.run(make_topics(s.kafka_bootstrap, mtag, partitions=args.partitions))
    routing = f"routing.{mtag}"
    asyncio.run(ensure_topics(s.kafka_bootstrap, {routing: (1, {"cleanup.policy": "compact"})}))
    common = {**CONTROL, "FLOCK_ROUTING_TOPIC": routing}
    if args.device == "cuda":
        procs = [start_gpu_workers(db, topics, mtag, args.workers, args.gpus,
                                   {**common, "FLOCK_PARTITIONS": "all" if mode == "static" else "leases"})]
    else:
        if mode == "static":
            extra = [{**common, "FLOCK_PARTITIONS": ",".join(map(str, r))} for r in ranges(args.partitions, args.workers)]
        else:
            extra = [{**common, "FLOCK_PARTITIONS": "leases"} for _ in range(args.workers)]
        procs = [w.proc for w in start_workers(db, topics, mtag, args.workers, extra)]
    try:
        if mode == "managed":
            env = {**os.environ, **topics.env(), **common, "FLOCK_DATABASE_URL": db,
                   "FLOCK_CONSUMER_GROUP": f"grp-{mtag}"}
            log = open(ROOT / ".flock" / "logs" / f"bench-manager-{mtag}.log", "a")
            procs.append(subprocess.Popen([sys.executable, "-m", "workers.cli", "manager"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            time.sleep(3)  # leases placed
        t0 = time.time()
        if probe:  # the host's capacity: uniform tenants offered more than it can serve; what is
            # not served within the probe's length expires (cheap replies), so ok replies/s ~ capacity
            measured = asyncio.run(drive(s.kafka_bootstrap, topics, routing, tenants, args, args.probe_seconds,
                                         seed=3, rate=rate, dist="uniform", timeout=args.probe_seconds))
            measured["capacity_rps"] = round(measured["statuses"].get("ok", 0) / measured["duration_s"], 1)
            return {"mode": "probe", "measured": measured, "capacity": registered_capacity(db, topics.requests)}
        warm = asyncio.run(drive(s.kafka_bootstrap, topics, routing, tenants, args, args.warmup, seed=1, rate=rate))
        measured = asyncio.run(drive(s.kafka_bootstrap, topics, routing, tenants, args, args.seconds, seed=2,
                                     rate=rate))
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
        return {"mode": mode, "rate": rate, "warmup": warm, "measured": measured, "moves": moves,
                "spread_tenants": routes}
    finally:
        stop(procs)


def registered_capacity(db: str, topic: str) -> dict[str, float]:
    """What each worker measured at start (thousand tokens/s of the base forward pass)."""
    from sqlalchemy import text
    with session_factory(db)() as sess:
        return dict(sess.execute(text("SELECT worker_id, capacity FROM workers WHERE topic = :t"), {"t": topic}).all())


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
    total = sum(w)
    part = [0.0] * args.partitions
    for t, x in zip(tenants, w):
        part[partition_for(t, args.partitions)] += x / total
    shares = [round(sum(part[p] for p in r), 3) for r in ranges(args.partitions, args.workers)]
    return {"shares": shares, "imbalance": round(max(shares) * args.workers, 3),
            "top_partition_share": round(max(part), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpus", default="all", help="cuda: which GPUs, as `flockserve worker run --gpus`")
    ap.add_argument("--workers", type=int, default=2, help="cpu: pinned CPU workers (cuda: one per GPU)")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--tenants", type=int, default=None, help="default 48 (cpu), 10,000 (cuda)")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--rate", type=float, default=230.0, help="requests/s offered (open loop), without --load")
    ap.add_argument("--load", default="", help="fractions of the measured host capacity, e.g. 0.7,0.8,0.9")
    ap.add_argument("--probe-rate", type=float, default=None, help="offered while measuring capacity "
                    "(default 600 req/s cpu, 20,000 cuda: more than the host serves)")
    ap.add_argument("--probe-seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--min-words", type=int, default=4)
    ap.add_argument("--max-words", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--modes", default="static,managed")
    ap.add_argument("--quick", action="store_true", help="cpu smoke form: 12 tenants, 6 partitions, 8 s + 10 s")
    args = ap.parse_args()
    if args.quick:
        args.tenants, args.partitions, args.warmup, args.seconds = args.tenants or 12, 6, 8.0, 10.0
        args.rate, args.probe_seconds = min(args.rate, 40.0), min(args.probe_seconds, 8.0)
    if args.device == "cuda":
        try:  # as the CLI would refuse it: one line
            args.workers = len(select_gpus(args.gpus, visible_gpus()))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}")
    args.tenants = args.tenants or (10_000 if args.device == "cuda" else 48)
    probe_rate = args.probe_rate or (20_000.0 if args.device == "cuda" else 600.0)

    db = settings().database_url
    migrate.upgrade("head", db)
    # Fixed tenant names, so the tenant -> partition hash (and thus static imbalance) is reproducible.
    tenants = ensure_tenants(db, args.tenants)
    static = static_imbalance(tenants, args)
    tag = f"bb{int(time.time()) % 10**7}"
    probe = None
    if args.load:
        probe = run_mode("managed", args, db, tenants, tag, probe_rate, probe=True)
        host_rps = probe["measured"]["capacity_rps"]
        loads = [(float(f), float(f) * host_rps) for f in args.load.split(",")]
    else:
        loads = [(None, args.rate)]
    results = []
    for i, (frac, rate) in enumerate(loads):
        for m in args.modes.split(","):
            r = run_mode(m, args, db, tenants, f"{tag}{i}", rate)
            r["load_fraction"] = frac
            results.append(r)

    unit = f"{args.workers} GPU workers ({args.gpus})" if args.device == "cuda" else f"{args.workers} workers (1 core each)"
    print(f"\n{unit}, {args.partitions} partitions, {args.tenants} tenants Zipf s={args.zipf}, "
          f"{args.seconds:.0f}s measured after {args.warmup:.0f}s warm-up")
    if probe:
        print(f"host capacity: {probe['measured']['capacity_rps']} req/s served ok under {probe_rate:.0f} offered "
              f"(uniform tenants); registered capacities {probe['capacity']}")
    print(f"static hash assignment: predicted worker load shares {static['shares']}, "
          f"imbalance (max/mean) {static['imbalance']}; largest partition {static['top_partition_share']} of load")
    print(f"{'load':>5} {'offered':>8} {'mode':<8} {'throughput_rps':>14} {'p50_ms':>8} {'p99_ms':>9} {'timeouts':>8} "
          f"{'dups':>5} {'moves':>5} {'spread':>6}")
    for r in results:
        m = r["measured"]
        frac = f"{r['load_fraction']:.0%}" if r["load_fraction"] is not None else "-"
        print(f"{frac:>5} {r['rate']:>8.0f} {r['mode']:<8} {m['throughput_rps']:>14} {m['p50_ms']:>8} {m['p99_ms']:>9} "
              f"{m['timeouts']:>8} {m['duplicates']:>5} {r['moves']:>5} {r['spread_tenants']:>6}")
    by_rate: dict[float, dict] = {}
    for r in results:
        by_rate.setdefault(r["rate"], {})[r["mode"]] = r["measured"]
    for rate, got in by_rate.items():
        if {"static", "managed"} <= set(got):
            a, b = got["static"], got["managed"]
            print(f"at {rate:.0f} req/s: managed/static throughput {b['throughput_rps'] / max(a['throughput_rps'], 1e-9):.2f}x, "
                  f"p99 {a['p99_ms'] / max(b['p99_ms'], 1e-9):.1f}x lower")
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "balance_bench.json").write_text(json.dumps({"args": vars(args), "static_prediction": static,
                                                        "probe": probe, "results": results}, indent=2))


if __name__ == "__main__":
    main()
