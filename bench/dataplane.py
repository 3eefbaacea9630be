"""CPU cost of the host path: the real `flockserve worker run` on the real services, near-zero engine.

    .venv/bin/python bench/dataplane.py [--requests 20000] [--edges 1 2] [--partitions 8] [--json]
                                        [--auth [--forged 1.0]] [--rate 500 --seconds 20]

--rate R (open loop) replaces the backlog: once the warm-up requests are answered, the bench
produces R requests/s for --seconds while the worker runs, so fetches and batches are as small as
R makes them; rate 0 measures the idle worker (its CPU per second, "idle cores busy"). A worker
on a GPU host spends most of its life below its capacity, where per-fetch, per-batch and per-tick
costs are spread over few requests: that is the row to watch there.

--auth gives every tenant a signing key, signs every request and runs the worker with
FLOCK_AUTH_REQUIRED=1: the "auth" row is the signature check's CPU per request. --forged F adds
F forged requests (signed with a key the tenant does not have) per real one to the backlog:
"authentic answered/s" against a run without them is what a flood of forgeries costs real tenants.

Needs the local services (scripts/services up) and a migrated database. Builds a tiny random
BERT checkpoint (1 layer, 64 wide, the MiniLM tokenizer) under bench_out/dataplane/, registers 64
LoRA tenants for it through the adapter store, and for each value of --edges:

  1. creates fresh topics and produces the whole backlog (warm-up requests touching every tenant
     first, then ``--requests`` short texts of 8-64 tokens) BEFORE the worker starts;
  2. starts `flockserve worker run` (FLOCK_EDGES=<n>; FLOCK_DEVICE=cpu);
  3. measures from its readiness (start-up left out; the one-time adapter loads of the tenants
     are in) until every request is answered: requests/s, and the CPU of all the
     worker's processes (its process group, from /proc: utime+stime, reaped children included)
     per request, split by stage with the worker's own per-batch accounting
     (``flock_stage_cpu_seconds_total{stage}``, ``flock_thread_cpu_seconds_total{thread}``).

Rows: consume, decode, tokenise, batch, engine (the engine's threads), reply_encode, produce,
commit are timed by the worker per batch; "loop residual" is the rest of the event-loop threads
(aiokafka's fetch/send I/O tasks, asyncio, HTTP); "native pools" is CPU of threads Python does not
know (torch/OpenMP, tokenizers); "total" is /proc. CPU time, not wall time, is the figure that
matters on a shared machine: "worker cores busy" (CPU seconds per wall second) and the host's
load average say whether requests/s was bound by the worker or by other work on the host. Prints a table, writes bench_out/dataplane-<ts>.json (or $OUT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from schema.messages import Headers, InferReply, InferRequest  # noqa: E402
from tests.serving_harness import WorkerProcess, make_topics  # noqa: E402
from workers.config import settings  # noqa: E402
from workers.kafka_conn import kafka_options  # noqa: E402
from workers.loadgen import WORDS  # noqa: E402
from workers.serving.metrics import STAGES  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def tiny_checkpoint(out: Path) -> Path:
    """1 layer, 64 wide, random weights; the MiniLM tokenizer (vocabulary 30522)."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    from workers.engine.synthetic import save_random_bert
    from workers.models import resolve_model_dir
    out.mkdir(parents=True, exist_ok=True)
    save_random_bert(str(out), hidden=64, layers=1, heads=2, intermediate=128, max_pos=512)
    minilm = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / f).is_file():
            shutil.copy(minilm / f, out / f)
    return out


def register_tenants(model_dir: Path, tag: str, n: int) -> list[str]:
    import torch

    from tests.adapter_factory import random_delta
    from workers.adapters.store import AdapterStore, make_backend
    from workers.db import session_factory
    from workers.models import base_dims
    from workers.tenants import TenantRegistry
    sessions = session_factory(settings().database_url)
    reg, store = TenantRegistry(sessions), AdapterStore(sessions, make_backend("postgres", Path("/nonexistent")))
    dims = base_dims(str(model_dir))
    out = []
    for i in range(n):
        tid = f"{tag}-{i}"
        config = {"r": 4, "alpha": 8, "sites": ["q", "v"], "task": "seq_cls",
                  "labels": [f"l{j}" for j in range(2 + i % 3)], "pooling": "mean"}
        tensors = random_delta("lora", config, dims, seed=i)
        tensors["head.weight"] = torch.randn(len(config["labels"]), dims.hidden,
                                             generator=torch.Generator().manual_seed(i))
        reg.create(tid)
        store.import_tensors(tid, "lora", config, tensors, str(model_dir))
        out.append(tid)
    return out


def short_texts(n: int, seed: int) -> list[str]:
    """8-64 tokens each with the MiniLM tokenizer (about 6-50 words of this vocabulary + 2 specials)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 50))) for _ in range(n)]


def tenant_keys(tenants: list[str]) -> dict[str, tuple[str, bytes]]:
    """--auth: one signing key per tenant (as `flockserve tenant key create` makes them)."""
    from workers.auth import TenantKeys, decode_key
    from workers.db import session_factory
    keys = TenantKeys(session_factory(settings().database_url))
    return {t: decode_key(keys.create(t)[1]) for t in tenants}


def signed(r: InferRequest, keys: dict[str, tuple[str, bytes]] | None, forged: bool = False) -> tuple[bytes, list]:
    """Value and headers; signed with the tenant's key, or (forged) with a key it does not have."""
    from workers.auth import sign
    value, headers = r.encode(), r.headers()
    if keys is not None:
        key_id, secret = keys[r.tenant_id]
        headers.append((Headers.AUTH, sign(key_id, bytes(32) if forged else secret, value)))
    return value, headers


async def produce_backlog(bootstrap: str, topic: str, reqs: list[InferRequest],
                          keys: dict[str, tuple[str, bytes]] | None = None, forged: set[str] = frozenset()) -> None:
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=20,
                         max_batch_size=256 * 1024)
    await p.start()
    try:
        futs = []
        for r in reqs:
            value, headers = signed(r, keys, r.request_id in forged)
            futs.append(await p.send(topic, value, key=r.tenant_id.encode(), headers=headers))
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def produce_paced(bootstrap: str, topic: str, reqs: list[InferRequest], rate: float, seconds: float,
                        keys: dict[str, tuple[str, bytes]] | None = None) -> dict[str, float]:
    """``reqs`` at ``rate`` per second (open loop: on schedule whatever the replies do), then
    wait until ``seconds`` have passed. Returns request id -> wall time (ms) it was handed to the
    producer."""
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=1)
    await p.start()
    try:
        futs, start, sent = [], time.monotonic(), {}
        for i, r in enumerate(reqs):
            ahead = start + i / rate - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
            value, headers = signed(r, keys)
            sent[r.request_id] = time.time() * 1000
            futs.append(await p.send(topic, value, key=r.tenant_id.encode(), headers=headers))
        await asyncio.gather(*futs)
        await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))
        return sent
    finally:
        await p.stop()


async def reply_latencies(bootstrap: str, topic: str, sent: dict[str, float]) -> list[float]:
    """ms from handing each request to the producer to its reply's record timestamp (the
    worker's producer stamps it when the reply is built: Kafka CreateTime)."""
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), enable_auto_commit=False,
                         auto_offset_reset="earliest")
    await c.start()
    try:
        tps = await _partitions(c, topic)
        ends = await c.end_offsets(tps)
        c.assign(tps)
        out, left = [], {tp for tp in tps if ends[tp] > 0}
        while left:
            for tp, recs in (await c.getmany(timeout_ms=500)).items():
                for rec in recs:
                    t = sent.get(InferReply.decode(rec.value).request_id)
                    if t is not None:
                        out.append(rec.timestamp - t)
                if recs and recs[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
        return out
    finally:
        await c.stop()


async def _partitions(c, topic: str) -> list:
    from aiokafka import TopicPartition
    parts = c.partitions_for_topic(topic)
    while not parts:
        await c._client.force_metadata_update()  # noqa: SLF001 - as tests/serving_harness.collect
        parts = c.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in parts]


async def wait_for_replies(bootstrap: str, topic: str, total: int, timeout: float) -> None:
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), enable_auto_commit=False)
    await c.start()
    try:
        tps = await _partitions(c, topic)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum((await c.end_offsets(tps)).values()) >= total:
                return
            await asyncio.sleep(0.1)
    finally:
        await c.stop()


async def wait_for_commits(bootstrap: str, topic: str, group: str, timeout: float) -> None:
    """--forged: forgeries over their tenant's refusal budget get no reply, so "done" is every
    request offset committed by the worker's group (asked of the broker, not the worker)."""
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = await _partitions(c, topic)
        ends = await c.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [(await c.committed(tp) or 0) >= ends[tp] for tp in tps]
            if all(done):
                return
            await asyncio.sleep(0.1)
    finally:
        await c.stop()


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process of the group, plus what their reaped children used."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += sum(int(x) for x in fields[11:15]) / TICK
    return total


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(("flock_stage_cpu_seconds_total", "flock_thread_cpu_seconds_total",
                            "flock_replies_total", "flock_batch_sequences_count", "flock_batch_sequences_sum",
                            "flock_engine_batches_total", "flock_engine_sequences_total",
                            "flock_auth_unanswered_total", "flock_auth_failures_total")):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def replies(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("flock_replies_total"))


def run_once(args, model_dir: Path, tenants: list[str], edges: int, tag: str,
             keys: dict[str, tuple[str, bytes]] | None = None) -> dict:
    s = settings()
    topics = asyncio.run(make_topics(s.kafka_bootstrap, tag, partitions=args.partitions))
    warm = [InferRequest(tenant_id=t, text="warm up " + t) for t in tenants for _ in range(2)]
    rng = random.Random(7)
    texts = short_texts(args.requests, seed=1)
    reqs = [InferRequest(tenant_id=rng.choice(tenants), text=x) for x in texts]
    # --forged F: F forged requests (a key the tenant does not have) per real one, interleaved.
    forged: set[str] = set()
    if args.forged:
        mixed = []
        for i, r in enumerate(reqs):
            mixed.append(r)
            for _ in range(int(args.forged) + (rng.random() < args.forged % 1)):
                f = InferRequest(tenant_id=r.tenant_id, text=r.text)
                forged.add(f.request_id)
                mixed.append(f)
        reqs = mixed
    paced = args.rate is not None
    if paced:  # only the warm-up is a backlog; the rest is produced at --rate once it is answered
        reqs = [InferRequest(tenant_id=rng.choice(tenants), text=x)
                for x in short_texts(int(args.rate * args.seconds), seed=1)]
    t = time.perf_counter()
    asyncio.run(produce_backlog(s.kafka_bootstrap, topics.requests, warm if paced else warm + reqs, keys, forged))
    print(f"[dataplane] edges={edges}: backlog of {len(warm)} + {len(reqs)} requests produced in "
          f"{time.perf_counter() - t:.1f}s; starting the worker", flush=True)
    env = {"FLOCK_EDGES": str(edges), "FLOCK_DEFAULT_BASE_MODEL": str(model_dir), "FLOCK_DEVICE": "cpu",
           "FLOCK_BATCH_MAX_TOKENS": str(args.max_tokens), "FLOCK_BATCH_MAX_SEQS": str(args.max_seqs),
           "FLOCK_COMMIT_INTERVAL_MS": "200", "FLOCK_VERSION_POLL_S": "60",
           # One thread per pool: the near-zero engine's torch/OpenMP threads would otherwise spin
           # on a shared 2-core machine and bill that as CPU; tokenisation scales by processes.
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if keys is not None:
        env["FLOCK_AUTH_REQUIRED"] = "1"
    env.update(dict(kv.split("=", 1) for kv in args.env))
    w = WorkerProcess(s.database_url, topics, tag, **env)
    total = len(warm) + len(reqs)
    try:
        w.start(timeout=300, poll_s=0.02)
    except AssertionError:
        if w.proc is not None and w.proc.poll() is None:
            w.kill9()  # never leave a worker behind
        raise
    # From readiness on: start-up (imports, model load) is left out, the one-time adapter loads
    # of the tenants are in (warm-up requests touch each tenant first).
    if paced:
        asyncio.run(wait_for_replies(s.kafka_bootstrap, topics.replies, len(warm), args.timeout))
        time.sleep(1.0)  # the warm-up's last acks and commit
    cpu0, t0 = group_cpu(w.proc.pid), time.perf_counter()
    m0 = scrape(w.port)
    try:
        # Progress from the reply topic's end offsets: scraping /metrics often would bill the
        # worker for the bench's own polling.
        if paced:
            sent = asyncio.run(produce_paced(s.kafka_bootstrap, topics.requests, reqs, args.rate, args.seconds, keys))
            asyncio.run(wait_for_replies(s.kafka_bootstrap, topics.replies, total, args.timeout))
        elif forged:
            asyncio.run(wait_for_commits(s.kafka_bootstrap, topics.requests, w.env["FLOCK_CONSUMER_GROUP"], args.timeout))
        else:
            asyncio.run(wait_for_replies(s.kafka_bootstrap, topics.replies, total, args.timeout))
        cpu1, t1 = group_cpu(w.proc.pid), time.perf_counter()
        m1 = scrape(w.port)
        # Committed is not yet counted: the last replies' acks (and an edge busy answering the
        # group's metrics call) can trail the commit by a moment.
        settle = time.monotonic() + 30
        while replies(m1) + m1.get("flock_auth_unanswered_total", 0.0) < total and time.monotonic() < settle:
            time.sleep(0.5)
            m1 = scrape(w.port)
    finally:
        rc = w.terminate()
    unanswered = m1.get("flock_auth_unanswered_total", 0.0) - m0.get("flock_auth_unanswered_total", 0.0)
    n = replies(m1) - replies(m0) + unanswered
    idle = paced and not reqs
    if idle:  # rate 0: per second of wall time instead of per request
        n = t1 - t0
    if replies(m1) + m1.get("flock_auth_unanswered_total", 0.0) < total:  # since start, not since m0
        raise SystemExit(f"only {replies(m1):.0f} of {total} replies ({m1.get('flock_auth_unanswered_total', 0.0):.0f} "
                         "more refusals counted, "
                         f"not answered) within {args.timeout}s; refusals by reason "
                         f"{ {k: v for k, v in m1.items() if k.startswith('flock_auth_failures')} }:\n{w.log_tail()}")

    ok = m1.get('flock_replies_total{status="ok"}', 0.0)
    if ok < total - len(forged):
        print(f"[dataplane] warning: only {ok:.0f} of {total} replies are ok", flush=True)

    def d(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)
    us = {st: d(f'flock_stage_cpu_seconds_total{{stage="{st}"}}') / n * 1e6 for st in STAGES}
    cpu_total = (cpu1 - cpu0) / n * 1e6
    native = d('flock_thread_cpu_seconds_total{thread="other"}') / n * 1e6
    us["native pools"] = native
    us["loop residual"] = cpu_total - sum(us.values())
    us["total"] = cpu_total
    seqs = d("flock_batch_sequences_sum") / max(1.0, d("flock_batch_sequences_count"))
    lat = sorted(asyncio.run(reply_latencies(s.kafka_bootstrap, topics.replies, sent))) if paced and reqs else []

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
    return {"edges": edges, "requests": 0 if idle else int(n), "seconds": t1 - t0, "rps": 0.0 if idle else n / (t1 - t0),
            "offered_rps": args.rate, "per": "second" if idle else "request",
            "auth": keys is not None, "forged": len(forged), "ok_rps": (n - len(forged)) / (t1 - t0),
            "cores_busy": (cpu1 - cpu0) / (t1 - t0), "ok_replies": int(ok), "load_avg": os.getloadavg()[0],
            "cpu_us_per_request": us, "mean_batch_seqs": seqs, "exit_code": rc,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "n": len(lat)},
            "threads_us": {k: d(f'flock_thread_cpu_seconds_total{{thread="{k}"}}') / n * 1e6
                           for k in ("loop", "tokenise", "engine", "other")}}


def table(results: list[dict]) -> str:
    rows = list(results[0]["cpu_us_per_request"])
    head = f"{'CPU µs / ' + results[0]['per']:22s}" + "".join(f"{'edges=' + str(r['edges']):>12s}" for r in results)
    lines = [head, "-" * len(head)]
    for k in rows:
        lines.append(f"{k:22s}" + "".join(f"{r['cpu_us_per_request'][k]:12.1f}" for r in results))
    lines.append("-" * len(head))
    if results[0]["offered_rps"] is not None:
        lines.append(f"{'offered requests/s':22s}" + "".join(f"{r['offered_rps']:12.0f}" for r in results))
    lines.append(f"{'requests/s':22s}" + "".join(f"{r['rps']:12.0f}" for r in results))
    if any(r["forged"] for r in results):
        lines.append(f"{'  of them forged':22s}" + "".join(f"{r['forged']:12d}" for r in results))
        lines.append(f"{'authentic answered/s':22s}" + "".join(f"{r['ok_rps']:12.0f}" for r in results))
    lines.append(f"{'worker cores busy':22s}" + "".join(f"{r['cores_busy']:12.2f}" for r in results))
    lines.append(f"{'host load average':22s}" + "".join(f"{r['load_avg']:12.1f}" for r in results))
    lines.append(f"{'mean seqs/batch':22s}" + "".join(f"{r['mean_batch_seqs']:12.1f}" for r in results))
    if results[0]["latency_ms"]["n"]:
        for q in ("p50", "p99"):
            lines.append(f"{'latency ' + q + ' ms':22s}" + "".join(f"{r['latency_ms'][q]:12.1f}" for r in results))
    lines.append(f"{'requests measured':22s}" + "".join(f"{r['requests']:12d}" for r in results))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--edges", type=int, nargs="+", default=[1])
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--tenants", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before/after)")
    ap.add_argument("--env", nargs="*", default=[], help="extra FLOCK_*=value settings for the worker")
    ap.add_argument("--rate", type=float, default=None,
                    help="open loop: requests/s produced while the worker runs (0: idle worker), instead of a backlog")
    ap.add_argument("--seconds", type=float, default=20.0, help="with --rate: how long")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--auth", action="store_true", help="tenant keys; every request signed; FLOCK_AUTH_REQUIRED=1")
    ap.add_argument("--forged", type=float, default=0.0,
                    help="with --auth: forged requests (wrong key) per real one, interleaved in the backlog")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", ROOT / "bench_out"))
    model_dir = tiny_checkpoint(out_dir / "dataplane" / "tiny-bert-1x64")
    tag = f"dp{int(time.time())}"
    tenants = register_tenants(model_dir, tag, args.tenants)
    if args.forged and not args.auth:
        raise SystemExit("--forged needs --auth")
    keys = tenant_keys(tenants) if args.auth else None
    results = [run_once(args, model_dir, tenants, e, f"{tag}e{e}", keys) for e in args.edges]
    doc = {"label": args.label, "cpu_count": os.cpu_count(), "requests": args.requests,
           "partitions": args.partitions, "tenants": args.tenants, "argv": sys.argv[1:], "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dataplane-{args.label or 'run'}-{int(time.time())}.json"
    path.write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(results))
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
