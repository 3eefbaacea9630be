"""Fault scenarios. Each runs load through a real cluster, breaks something mid-way, waits for
every acknowledged request to be answered, and returns the checker's row."""

from __future__ import annotations

import asyncio
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scripts.faults.cluster import Cluster, services
from scripts.faults.history import History
from scripts.faults.load import Collector, drive, flood_forged, forgeries, wait_answered
from scripts.faults.poison import poison


@dataclass
class Ctx:
    database_url: str
    bootstrap: str
    short: bool
    out: Path

    def seconds(self, full: float, short: float) -> float:
        return short if self.short else full


async def _run_with_load(ctx: Ctx, cluster: Cluster, name: str, fault: Callable, *, rate: float, seconds: float,
                         at: float, timeout_s: float = 120.0, extra=None, answer_timeout: float = 180) -> tuple[History, str]:
    """Load for ``seconds`` (signed when the cluster has tenant keys); ``fault(history)`` (a
    coroutine) starts at ``at`` seconds."""
    h = History()
    col = Collector(ctx.bootstrap, cluster.topics.replies, cluster.topics.dlq, h)
    await col.start()
    load = asyncio.create_task(drive(ctx.bootstrap, cluster.topics.requests, h, cluster.tenants, rate=rate,
                                     seconds=seconds, timeout_s=timeout_s, extra=extra, keys=cluster.keys or None))
    await asyncio.sleep(at)
    start = time.monotonic()
    notes = await fault(h) or ""
    h.fault(name, start, time.monotonic())
    await load
    await wait_answered(h, answer_timeout)
    await asyncio.sleep(1.0)  # let late duplicates arrive so that they are counted
    await col.stop()
    return h, notes


def _row(name: str, h: History, notes: str = "", **extra) -> dict:
    r = h.check()
    r.update(scenario=name, notes=notes, **extra)
    r["_history"] = h
    return r


def _in_cluster(ctx: Ctx, prefix: str, fault_name: str, fault: Callable, *, cluster: dict | None = None,
                after: Callable | None = None, make_extra: Callable | None = None,
                **load) -> tuple[History, str, object]:
    """Set up a fresh cluster, run load with ``fault(cluster, history)`` injected (and the poison
    ``make_extra(cluster)`` interleaves), read ``after(cluster)`` (metrics) while it still runs,
    tear it down whatever happened."""
    c = Cluster(ctx.database_url, ctx.bootstrap, f"{prefix}{int(time.time()) % 10**6}", **(cluster or {})).setup()
    try:
        extra = make_extra(c) if make_extra else None
        h, notes = asyncio.run(_run_with_load(ctx, c, fault_name, lambda hist: fault(c, hist), extra=extra, **load))
        return h, notes, after(c) if after else None
    finally:
        c.teardown()


# ---------------------------------------------------------------- worker crashes
def worker_crash(ctx: Ctx, where: str) -> dict:
    """kill -9 at a precise point: after consuming (before replying) or after replying (before
    committing). The worker's own fault hook sends it SIGKILL there; a supervisor restarts it."""
    env_key = {"consume": "FLOCK_FAULT_CRASH_AFTER_CONSUME", "commit": "FLOCK_FAULT_CRASH_BEFORE_COMMIT"}[where]
    window = "consume and reply" if where == "consume" else "reply and commit"

    async def fault(cluster: Cluster, h: History) -> str:
        victim = cluster.replace_worker(0, **{env_key: "40"})  # crashes on its 40th record/reply
        t = time.monotonic()
        while victim.proc.poll() is None and time.monotonic() - t < 60:
            await asyncio.sleep(0.1)
        died = victim.proc.poll() in (-9, 137)
        await asyncio.to_thread(cluster.replace_worker, 0)  # supervisor restart
        return f"crashed by SIGKILL: {died}"

    h, notes, _ = _in_cluster(ctx, f"f{where[:3]}", f"kill -9 between {window}", fault, cluster={"workers": 2},
                              rate=40, seconds=ctx.seconds(40, 18), at=3)
    return _row(f"worker kill -9 ({'consume→reply' if where == 'consume' else 'reply→commit'})", h, notes)


# ---------------------------------------------------------------- infrastructure outages
def _outage(ctx: Ctx, tag: str, title: str, service: str, down_s: float, seconds: float, note: str) -> dict:
    """Stop a service process (``scripts/services <service>-stop``), keep it down, start it again."""
    async def fault(cluster: Cluster, h: History) -> str:
        t = time.monotonic()
        await asyncio.to_thread(services, f"{service}-stop")
        await asyncio.sleep(down_s)
        await asyncio.to_thread(services, f"{service}-start")
        return f"{note}; down {time.monotonic() - t:.1f}s"

    h, notes, _ = _in_cluster(ctx, tag, f"{service} down", fault, cluster={"workers": 2}, rate=30,
                              seconds=seconds, at=4, answer_timeout=240)
    return _row(title, h, notes)


def kafka_restart(ctx: Ctx) -> dict:
    return _outage(ctx, "fkaf", "Kafka broker restart", "kafka", ctx.seconds(10, 3), ctx.seconds(45, 20),
                   "broker restarted on the same log dir")


def postgres_outage(ctx: Ctx) -> dict:
    return _outage(ctx, "fpg", "PostgreSQL unavailable", "pg", ctx.seconds(30, 6), ctx.seconds(50, 20),
                   "resident tenants kept serving")


# ---------------------------------------------------------------- control plane
def handover(ctx: Ctx) -> dict:
    """Warm hand-overs under load: drain one worker (all its partitions move), undo the drain and
    let the rebalancer move partitions back."""
    async def fault(cluster: Cluster, h: History) -> str:
        import subprocess
        import sys
        env = cluster.managers[0].env
        victim = cluster.workers[0].env["FLOCK_WORKER_ID"]
        before = await asyncio.to_thread(cluster.leased)
        cli = [sys.executable, "-m", "workers.cli"]
        await asyncio.to_thread(subprocess.run, cli + ["worker", "drain", victim], env=env,
                                capture_output=True, stdin=subprocess.DEVNULL, check=True)
        t = time.monotonic()
        while time.monotonic() - t < 30:
            owners = await asyncio.to_thread(cluster.leased)
            if owners and victim not in owners.values():
                break
            await asyncio.sleep(0.3)
        drained = await asyncio.to_thread(cluster.leased)
        moved = sum(1 for p, w in before.items() if drained.get(p) != w)
        await asyncio.to_thread(subprocess.run, cli + ["worker", "drain", victim, "--undo"], env=env,
                                capture_output=True, stdin=subprocess.DEVNULL, check=True)
        await asyncio.to_thread(subprocess.run, cli + ["rebalance", "--apply", "--force"], env=env,
                                capture_output=True, stdin=subprocess.DEVNULL)
        await asyncio.sleep(ctx.seconds(8, 4))
        after = await asyncio.to_thread(cluster.leased)
        back = sum(1 for p, w in drained.items() if after.get(p) != w)
        return f"drain moved {moved} partitions in {time.monotonic() - t:.1f}s; rebalance moved {back} back"

    h, notes, _ = _in_cluster(ctx, "fho", "hand-over", fault, cluster={"workers": 3}, rate=40,
                              seconds=ctx.seconds(45, 22), at=4)
    return _row("partition hand-over / rebalance under load", h, notes)


def manager_failover(ctx: Ctx) -> dict:
    async def fault(cluster: Cluster, h: History) -> str:
        leader = cluster.managers[0]  # started first: holds the leadership
        leader.kill9()
        # Prove the standby leads: a worker crash must still be taken over.
        cluster.workers[1].kill9()
        t = time.monotonic()
        while time.monotonic() - t < 60:
            owners = await asyncio.to_thread(cluster.leased)
            if owners and all(w == cluster.workers[0].env["FLOCK_WORKER_ID"] for w in owners.values()) \
                    and len(owners) == cluster.partitions:
                return f"standby took over; dead worker's partitions re-leased in {time.monotonic() - t:.1f}s"
            await asyncio.sleep(0.5)
        return "standby did NOT re-lease the dead worker's partitions within 60s"

    h, notes, _ = _in_cluster(ctx, "fmgr", "manager kill -9", fault, cluster={"workers": 2, "managers": 2},
                              rate=30, seconds=ctx.seconds(40, 22), at=4)
    return _row("manager killed, standby takes over", h, notes)


# ---------------------------------------------------------------- overload and bad input
def flood(ctx: Ctx) -> dict:
    high, partitions, seconds = 60, 4, ctx.seconds(20, 6)

    async def fault(cluster: Cluster, h: History) -> str:
        return "offered several times capacity with 2 s deadlines"

    def measure(cluster: Cluster) -> tuple[list[float], list[float]]:
        return ([w.metric("flock_inflight_requests_peak") or 0 for w in cluster.workers],
                [_rss_mb(w.proc.pid) for w in cluster.workers])

    h, _, (peaks, rss) = _in_cluster(
        ctx, "fflood", "flood", fault, after=measure,
        cluster={"workers": 2, "partitions": partitions,
                 "worker_env": {"FLOCK_PARTITION_HIGH_WATER": str(high), "FLOCK_PARTITION_LOW_WATER": "20"}},
        rate=ctx.seconds(1500, 1200), seconds=seconds, at=0.5, timeout_s=2.0, answer_timeout=240)
    bound = 2 * high * partitions
    r = h.check()
    notes = (f"offered {r['sent'] / seconds:.0f} req/s; peak unreplied per worker {max(peaks):.0f} "
             f"(bound {bound}); worker peak RSS {max(rss):.0f} MB; expired={r['statuses'].get('expired', 0)}")
    return _row("flood beyond capacity", h, notes, bounded=max(peaks) <= bound)


def forged_flood(ctx: Ctx) -> dict:
    """Authenticated tenants at a steady rate, then forged requests (the tenants' real key ids,
    wrong secrets: each costs a full MAC check) at ``times`` that rate. Authenticated throughput
    and p99 before and during the flood, and their ratios; no forged request may be computed."""
    rate, times = 40.0, ctx.seconds(25, 10)
    seconds, at, flood_s = ctx.seconds(50, 18), ctx.seconds(20, 8), ctx.seconds(20, 6)
    forged: list = []
    acked: list[int] = []

    async def fault(cluster: Cluster, h: History) -> str:
        forged.extend(forgeries(cluster.tenants, cluster.keys, n=int(rate * times * flood_s) + 1))
        n = await flood_forged(ctx.bootstrap, cluster.topics.requests, forged, rate=rate * times, seconds=flood_s)
        acked.append(n)
        return f"{n} forged requests at {times}x the authenticated rate ({rate * times:.0f}/s) for {flood_s:.0f}s"

    def counted(cluster: Cluster) -> dict[str, float]:
        names = ("flock_auth_unanswered_total", 'flock_auth_failures_total{reason="bad_signature"}')
        return {n: sum(w.metric(n) or 0 for w in cluster.workers) for n in names}

    h, notes, metrics = _in_cluster(
        ctx, "fforge", "forged flood", fault, after=counted, rate=rate, seconds=seconds, at=at,
        cluster={"workers": 2, "tenants": ctx.seconds(16, 6), "keys": True, "worker_env": {"FLOCK_AUTH_REQUIRED": "1"}})
    _, start, end = h.faults[0]
    first: dict[str, tuple[str, float]] = {}
    for rid, status, t in h.replies:
        first.setdefault(rid, (status, t))

    def window(a: float, b: float) -> tuple[float, float | None]:
        """Authenticated replies/s received in [a, b) and the p99 of requests sent in it."""
        lat = sorted((first[rid][1] - s.t_send) * 1000 for rid, s in h.sent.items()
                     if a <= s.t_send < b and rid in first)
        got = sum(1 for rid, (_, t) in first.items() if rid in h.sent and a <= t < b)
        return got / (b - a), (round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None)

    warm = min(4.0, at / 2)  # the first seconds load each tenant's adapter once: left out
    rps_before, p99_before = window(start - (at - warm), start)
    rps_during, p99_during = window(start, end)
    forged_ids = {f[3] for f in forged}
    answers = [status for rid, status, _ in h.replies if rid in forged_ids]
    computed = sum(1 for status in answers if status != "unauthenticated")
    slowdown = round(p99_during / p99_before, 2) if p99_before and p99_during else None
    notes += (f"; host load {os.getloadavg()[0]:.1f}; authenticated {rps_before:.1f} -> {rps_during:.1f} replies/s, p99 {p99_before} -> {p99_during} ms "
              f"(x{slowdown}); forged: {len(answers)} answered unauthenticated, "
              f"{metrics['flock_auth_unanswered_total']:.0f} only counted, {computed} computed")
    return _row(f"forged flood ({times}x the authenticated rate)", h, notes, forged_sent=acked[0] if acked else 0,
                forged_computed=computed, forged_answered=len(answers),
                forged_refused=metrics['flock_auth_failures_total{reason="bad_signature"}'],
                auth_rps_before=round(rps_before, 1), auth_rps_during=round(rps_during, 1),
                p99_before_ms=p99_before, p99_during_ms=p99_during, slowdown=slowdown,
                throughput_ratio=round(rps_during / rps_before, 3) if rps_before else None)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def poison_inputs(ctx: Ctx) -> dict:
    n_poison = 1000 if ctx.short else 10_000
    rng = random.Random(7)
    seconds, rate = ctx.seconds(40, 15), 40.0
    per_good = max(1, math.ceil(n_poison / (rate * seconds)))
    made: list = []

    def make_extra(cluster: Cluster) -> Callable:
        def extra(i: int):
            batch = [poison(i * per_good + k, rng, cluster.tenants) for k in range(per_good)]
            made.extend(batch)
            return batch
        return extra

    async def fault(cluster: Cluster, h: History) -> str:
        return "fuzzed records interleaved with good requests"

    h, notes, _ = _in_cluster(ctx, "fpoi", "poison", fault, cluster={"workers": 2}, make_extra=make_extra,
                              rate=rate, seconds=seconds, at=0)
    return _row("poison inputs", h, f"{len(made)} {notes}; {h.poison_to_dlq} owed a DLQ record")


def adapter_uploads(ctx: Ctx) -> dict:
    from scripts.faults.adapter_attacks import run
    r = run(ctx.database_url, f"attack-{int(time.time()) % 10**6}", Path(tempfile.mkdtemp()))
    ok = r["rejected"] == r["attempts"] and r["rows_written"] == 0 and r["blobs_written"] == 0 \
        and not r["code_executed"]
    return {"scenario": "malicious/corrupt adapter uploads", "sent": r["attempts"], "acked": r["attempts"],
            "replied": r["rejected"], "dlq": 0, "lost": 0 if ok else r["attempts"] - r["rejected"],
            "duplicates": 0, "late": 0, "recovery_s": None, "p99_during_fault_ms": None,
            "notes": f"{r['rejected']}/{r['attempts']} refused, rows written {r['rows_written']}, "
                     f"blobs written {r['blobs_written']}, code executed {r['code_executed']}",
            "outcomes": r["outcomes"]}


SCENARIOS: dict[str, Callable[[Ctx], dict]] = {
    "kill-consume": lambda c: worker_crash(c, "consume"),
    "kill-commit": lambda c: worker_crash(c, "commit"),
    "kafka-restart": kafka_restart,
    "postgres-outage": postgres_outage,
    "handover": handover,
    "manager-failover": manager_failover,
    "flood": flood,
    "forged-flood": forged_flood,
    "poison": poison_inputs,
    "adapters": adapter_uploads,
}
