"""Plan time of the control plane at scale (not a test; no services): a synthetic observed state of
100,000 tenants over 64 partitions and 16 workers (10,000 resident each), Zipf(1.0) load, the
load reports shaped as the workers send them (top-K tenants per partition, the most recently used
resident tenants). Times what one manager tick computes from it: ``state.balancer_inputs`` +
``balancer.plan`` and the hot-tenant routes (``tenant_costs`` + ``plan_routes``), median and p99
over repeats, for a balanced cluster, a skewed one, a dead worker and a forced rebalance.

    .venv/bin/python bench/balance_plan.py [--tenants 100000 --partitions 64 --workers 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schema.pet import PET_TYPES  # noqa: E402
from schema.tables import LeaseState, WorkerState  # noqa: E402
from schema.topics import partition_for  # noqa: E402
from workers.config import Settings  # noqa: E402
from workers.manager import balancer  # noqa: E402
from workers.manager.agent import RESIDENT_LISTED  # noqa: E402
from workers.manager.manager import balancer_config  # noqa: E402
from workers.manager.rates import LoadWindow  # noqa: E402
from workers.manager.routing import plan_routes  # noqa: E402
from workers.manager.state import (LeaseRow, Observed, WorkerRow, balancer_inputs, reported_tenants,  # noqa: E402
                                   tenant_costs)


def synthetic(n_tenants: int, n_parts: int, n_workers: int, resident: int, skew: float, dead: int,
              seed: int = 0) -> Observed:
    """Workers owning contiguous partition ranges; ``skew`` multiplies worker 0's partitions' load;
    the first ``dead`` workers stopped heartbeating (their leases are released)."""
    rng = random.Random(seed)
    top = LoadWindow(1.0).top_tenants  # the report's K, from its one home
    names = [f"tenant-{i:06d}" for i in range(n_tenants)]
    home = [partition_for(t, n_parts) for t in names]
    per_part: dict[int, list[tuple[str, float]]] = {p: [] for p in range(n_parts)}
    for i, t in enumerate(names):
        per_part[home[i]].append((t, 2000.0 / (i + 1)))  # Zipf(1.0) tokens/s
    owner = {p: f"w{p * n_workers // n_parts:02d}" for p in range(n_parts)}
    workers, leases = [], []
    for w in range(n_workers):
        wid = f"w{w:02d}"
        mine = [p for p in range(n_parts) if owner[p] == wid]
        parts = {}
        for p in mine:
            tenants = sorted(per_part[p], key=lambda kv: -kv[1])
            factor = skew if w == 0 else 1.0
            tok = factor * sum(k for _, k in tenants) + rng.uniform(0, 50)
            parts[str(p)] = {"requests_per_s": round(tok / 40, 3), "tokens_per_s": round(tok, 3),
                             "tenants": {t: round(factor * k, 3) for t, k in tenants[:top]},
                             "active_tenants": len(tenants), "arrivals_per_s": round(tok / 40, 3), "lag": 0}
        hot = [t for p in mine for t, _ in sorted(per_part[p], key=lambda kv: -kv[1])[:resident // max(1, len(mine))]]
        metrics = {"requests_per_s": sum(v["requests_per_s"] for v in parts.values()),
                   "tokens_per_s": sum(v["tokens_per_s"] for v in parts.values()), "partitions": parts,
                   "owned": {p: 1 for p in parts}, "resident_count": len(hot),
                   "resident_tenants": hot[:RESIDENT_LISTED], "mode": "leases"}
        alive = w >= dead
        workers.append(WorkerRow(wid, "host", "cpu", 1.0, WorkerState.SERVING if alive else WorkerState.STOPPED,
                                 1.0 if alive else 600.0, True, metrics, "flock.requests"))
        for p in mine:
            leases.append(LeaseRow(p, wid if alive else None, 1, LeaseState.ACTIVE if alive else LeaseState.RELEASED,
                                   None, 10.0 if alive else None, 3600.0))
    obs = Observed("flock.requests", workers, sorted(leases, key=lambda l: l.partition), {})
    pets = list(PET_TYPES)
    obs.pet_types = {t: pets[int(t.split("-")[1]) % len(pets)] for t in reported_tenants(workers)}  # as observe() reads
    return obs


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out, ms = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms, out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--resident", type=int, default=10_000, help="resident tenants per worker")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    s = Settings()
    cases = {"zipf": dict(skew=1.0, dead=0, force=False), "skewed x3": dict(skew=3.0, dead=0, force=False),
             "one worker dead": dict(skew=1.0, dead=1, force=False), "forced": dict(skew=1.0, dead=0, force=True)}
    rows = []
    for name, c in cases.items():
        obs = synthetic(args.tenants, args.partitions, args.workers, args.resident, c["skew"], c["dead"])
        size = max(len(json.dumps(w.metrics)) for w in obs.workers)
        t_in, (ws, parts) = timed(lambda: balancer_inputs(obs, s.pet_cost_weights, s.worker_timeout_s), args.repeats)
        cfg = balancer_config(s, c["force"])
        t_plan, plan = timed(lambda: balancer.plan(ws, parts, cfg, force=c["force"]), args.repeats)
        n = args.partitions
        t_routes, routes = timed(lambda: plan_routes(tenant_costs(obs, s.pet_cost_weights),
                                                     {p.partition: p.cost for p in parts}, n,
                                                     lambda t: partition_for(t, n), {},
                                                     factor=s.hot_tenant_factor), args.repeats)
        total = [a + b + r for a, b, r in zip(t_in, t_plan, t_routes)]
        rows.append({"case": name, "tenants": args.tenants, "partitions": args.partitions, "workers": args.workers,
                     "report_bytes_max": size, "moves": len(plan.moves), "routes": len(routes),
                     "imbalance_before": round(plan.imbalance_before, 3), "imbalance_after": round(plan.imbalance_after, 3),
                     **{f"{k}_ms_p50": round(statistics.median(v), 3) for k, v in
                        (("inputs", t_in), ("plan", t_plan), ("routes", t_routes), ("tick", total))},
                     **{f"{k}_ms_p99": round(pct(v, 0.99), 3) for k, v in
                        (("inputs", t_in), ("plan", t_plan), ("routes", t_routes), ("tick", total))}})
    if args.json:
        print(json.dumps({"repeats": args.repeats, "cases": rows}, indent=2))
        return
    print(f"{args.tenants:,} tenants, {args.partitions} partitions, {args.workers} workers "
          f"({args.resident:,} resident each), {args.repeats} repeats; ms p50 / p99")
    head = f"{'case':<17}{'moves':>6}{'imb':>13}{'inputs':>15}{'plan':>15}{'routes':>15}{'tick':>15}{'report':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cell = lambda k: f"{r[k + '_ms_p50']:.2f}/{r[k + '_ms_p99']:.2f}"  # noqa: E731
        print(f"{r['case']:<17}{r['moves']:>6}{r['imbalance_before']:>6.2f}>{r['imbalance_after']:<6.2f}"
              f"{cell('inputs'):>15}{cell('plan'):>15}{cell('routes'):>15}{cell('tick'):>15}"
              f"{r['report_bytes_max'] / 1024:>7.1f}KB")


if __name__ == "__main__":
    main()
