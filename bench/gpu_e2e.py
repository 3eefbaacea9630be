"""The whole system on a GPU host, in one run and one table: forward pass alone, ``Engine.submit``,
Kafka -> worker -> Kafka saturated from a backlog, and an open loop at 70 % of that rate.

    python bench/gpu_e2e.py --base bert-base --tenants 10000            # BERT-base shape, random weights
    python bench/gpu_e2e.py --base /path/to/all-MiniLM-L6-v2 --tenants 10000

Needs Kafka and PostgreSQL (the bundle's ``flock-up`` or ``scripts/services up``), a migrated
database and FLOCK_KAFKA_BOOTSTRAP / FLOCK_DATABASE_URL. Everything else it makes itself, under
--work (default /tmp/flock-gpu-e2e): the base checkpoint (``bert-base``: 12 x 768 random weights
with the MiniLM tokenizer), T tenants with LoRA r8 on q,v in a filesystem adapter store (kept and
reused by later runs), request topics, the request mix (lengths 8-128 tokens, uniform tenants).

Rows, all with the same tenants, request mix and batch shape:
  forward pass    plans built beforehand; only the GPU forward + heads are timed
  Engine.submit   tokenised batches in, outputs out (plan, H2D, forward, heads, D2H, outputs)
  full system     a backlog already in Kafka; a `flockserve worker run` (engine process + edges)
                  drains it; rate = replies between 20 % and 95 % of the backlog / time
  open loop       producers at 70 % of the full-system rate for --open-seconds; latency per
                  request = reply seen by the load generator - request produced (same host clock)
The load generator's own processes (producers, reply readers) run on the same host and take
cores from the worker; their count is printed.
Writes $OUT/gpu_e2e.json (or bench_out/) and prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from workers.loadgen import WORDS  # noqa: E402
from workers.kafka_conn import kafka_options  # noqa: E402

WORD_LIST = list(WORDS)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def log(msg: str) -> None:
    print(f"[gpu_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ set-up: model, tenants, mix
# Random checkpoints: BERT-base's shape for the GPU; "tiny" to try the bench itself on a CPU.
RANDOM_BASES = {"bert-base": {}, "tiny": {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 128}}


def prepare_base(spec: str, work: Path) -> Path:
    """A checkpoint directory with config.json, model.safetensors and tokenizer files."""
    if spec not in RANDOM_BASES:
        return Path(spec).resolve()
    out = work / "models" / f"{spec}-random"
    if not (out / "model.safetensors").exists():
        from workers.engine.synthetic import save_random_bert
        from workers.models import resolve_model_dir
        log(f"writing a random {spec} checkpoint with the MiniLM tokenizer")
        save_random_bert(str(out), **RANDOM_BASES[spec])
        tok_src = Path(os.environ.get("FLOCK_BENCH_TOKENIZER_DIR") or
                       resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2"))
        for f in TOKENIZER_FILES:
            if (tok_src / f).exists():
                shutil.copy(tok_src / f, out / f)
    return out


def _register_chunk(args) -> int:
    """Register tenants [lo, hi) with LoRA r8 on q,v (runs in a pool process)."""
    lo, hi, prefix, model_dir, store_dir, db_url = args
    import torch

    from workers.adapters.store import AdapterStore, make_backend
    from workers.db import session_factory
    from workers.models import base_dims
    from workers.tenants import TenantRegistry
    sessions = session_factory(db_url)
    reg = TenantRegistry(sessions)
    store = AdapterStore(sessions, make_backend("filesystem", Path(store_dir)))
    dims = base_dims(model_dir)
    r, h = 8, dims.hidden
    for i in range(lo, hi):
        g = torch.Generator().manual_seed(i)
        labels = [f"l{j}" for j in range(2 + i % 3)]
        t = {}
        for layer in range(dims.layers):
            for site in ("q", "v"):
                t[f"layers.{layer}.{site}.lora_A"] = torch.randn(r, h, generator=g) * 0.02
                t[f"layers.{layer}.{site}.lora_B"] = torch.randn(h, r, generator=g) * 0.02
        t["head.weight"] = torch.randn(len(labels), h, generator=g) * 0.05
        t["head.bias"] = torch.zeros(len(labels))
        tid = f"{prefix}-{i}"
        try:
            reg.create(tid)
        except Exception:  # noqa: BLE001 - exists from an earlier run: keep it
            continue
        store.import_tensors(tid, "lora", {"r": r, "alpha": 16, "sites": ["q", "v"], "task": "seq_cls",
                                            "labels": labels, "pooling": "cls"},
                             {k: v.to(torch.bfloat16) for k, v in t.items()}, model_dir)
    return hi - lo


def register_tenants(n: int, prefix: str, model_dir: Path, store_dir: Path, db_url: str, procs: int) -> list[str]:
    marker = store_dir / f".registered-{prefix}-{n}"
    tenants = [f"{prefix}-{i}" for i in range(n)]
    if marker.exists():
        log(f"{n} tenants already registered ({prefix}-*)")
        return tenants
    store_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, n // (procs * 4))
    chunks = [(lo, min(n, lo + step), prefix, str(model_dir), str(store_dir), db_url) for lo in range(0, n, step)]
    t0, done = time.time(), 0
    with mp.get_context("spawn").Pool(procs) as pool:
        for k in pool.imap_unordered(_register_chunk, chunks):
            done += k
            print(f"\r[gpu_e2e] registering tenants {done}/{n}", end="", flush=True)
    print(flush=True)
    log(f"registered {n} tenants in {time.time() - t0:.0f} s")
    marker.write_text("ok")
    return tenants


def make_mix(n: int, tenants: list[str], seed: int) -> list[tuple[str, str]]:
    """(tenant, text) pairs: 6-120 words (about 8-128 tokens), tenants uniform."""
    rng = random.Random(seed)
    return [(tenants[rng.randrange(len(tenants))],
             " ".join(rng.choice(WORD_LIST) for _ in range(rng.randint(6, 120)))) for _ in range(n)]


# ------------------------------------------------------------------ rows 1-2: engine in-process
def pool_slots(tenants: int) -> int:
    return max(1024, tenants + 512)


def engine_rows(model_dir: Path, store_dir: Path, db_url: str, tenants: list[str], mix, max_tokens: int,
                max_seqs: int, seconds: float) -> dict:
    import torch

    from workers.adapters.store import AdapterStore, make_backend
    from workers.db import session_factory
    from workers.engine.batch import RequestItem
    from workers.engine.runtime import Engine
    from workers.engine.tokenize import BatchTokenizer
    from workers.serving.adapter_source import StoreLoader

    store = AdapterStore(session_factory(db_url), make_backend("filesystem", store_dir))
    from workers.engine.pool import PoolConfig
    # Every tenant resident at once, as in the worker (FLOCK_ADAPTER_SLOTS below).
    engine = Engine(str(model_dir), StoreLoader(store, str(model_dir)),
                    pool_config=PoolConfig(device_bytes=0, default_slots=pool_slots(len(tenants)), load_threads=16))
    tok = BatchTokenizer(str(model_dir))
    try:
        log(f"engine: loading {len(tenants)} tenants into the adapter pool")
        t0 = time.time()
        engine.prefetch(tenants).result()
        log(f"engine: pool warm in {time.time() - t0:.0f} s")
        # Batches shaped as the worker forms them: up to max_tokens tokens and max_seqs sequences.
        batches, cur, cur_tok = [], [], 0
        ids = tok.tok([x for _, x in mix], truncation=True, max_length=128, return_attention_mask=False)["input_ids"]
        for (t, _), tid in zip(mix, ids):
            if cur and (cur_tok + len(tid) > max_tokens or len(cur) >= max_seqs):
                batches.append(tok.pack(cur))
                cur, cur_tok = [], 0
            cur.append(RequestItem(t, token_ids=tid))
            cur_tok += len(tid)
        if cur:
            batches.append(tok.pack(cur))
        seqs = sum(b.num_seqs for b in batches)
        log(f"engine: {len(batches)} batches, {seqs / len(batches):.0f} seqs and "
            f"{sum(b.num_tokens for b in batches) / len(batches):.0f} tokens per batch")
        for b in batches[:3]:
            engine.run(b)
        forward_s, forward_seqs = engine_forward_seconds(engine, batches)
        # submit: keep the engine's in-flight window full, outputs materialised as a reply needs them.
        t0 = time.perf_counter()
        done, futs, rounds = 0, [], 0
        while time.perf_counter() - t0 < seconds or rounds == 0:
            futs = [engine.submit(b) for b in batches]
            for f in futs:
                outs = f.result()
                for i in range(len(outs)):
                    o = outs[i]
                    _ = (o.label, o.scores)
                done += len(outs)
            rounds += 1
        submit_s = time.perf_counter() - t0
        return {"batches": len(batches), "seqs_per_batch": seqs / len(batches),
                "forward_seq_s": forward_seqs / forward_s, "submit_seq_s": done / submit_s,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    finally:
        engine.close()
        del engine
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def engine_forward_seconds(engine, batches) -> float:
    """GPU time of one pass over the batches with plans built beforehand (forward + heads)."""
    import torch

    from workers.engine import heads
    from workers.engine.plan import build_plan
    enc = engine.encoder
    with torch.inference_mode():
        plans = []
        for b in batches:
            got = engine.pool.acquire(b.tenant_ids)
            residents = [got[t] for t in b.tenant_ids]
            if not all(hasattr(r, "head_bank") for r in residents):  # not resident (pool full): skip the batch
                engine.pool.release([r for r in residents if hasattr(r, "head_bank")])
                continue
            plan = build_plan(b.input_ids, b.token_type_ids, b.cu_seqlens, residents, enc.base.position_offset,
                              engine.device, engine._want_tiles)  # noqa: SLF001 - the bench mirrors the launcher
            plans.append((plan, residents))

        def one_pass():
            for plan, _ in plans:
                hidden = enc.forward(plan)
                pooled = heads.pool_hidden(hidden, plan, enc.base.pooler_w, enc.base.pooler_b)
                for hg in plan.heads:
                    if hg.seq_order:
                        heads.seq_logits(hg, pooled)
        one_pass()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            one_pass()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        for _, residents in plans:
            engine.pool.release(residents)
    return dt, sum(p.num_seqs for p, _ in plans)


# ------------------------------------------------------------------ rows 3-4: through Kafka
def _produce_proc(args) -> int:
    """Produce (tenant, text) pairs; rate None = as fast as possible. request_id carries the send time."""
    bootstrap, topic, items, rate, tag = args
    from aiokafka import AIOKafkaProducer

    from schema.messages import InferRequest

    async def go() -> int:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), linger_ms=5, max_batch_size=512 * 1024, acks=1)
        await p.start()
        try:
            start = time.monotonic()
            for i, (t, x) in enumerate(items):
                if rate:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0.002:
                        await asyncio.sleep(delay)
                rid = f"{tag}-{i}-{time.time_ns()}"
                await p.send(topic, InferRequest(tenant_id=t, text=x, request_id=rid).encode(), key=t.encode())
            await p.flush()
        finally:
            await p.stop()
        return len(items)
    return asyncio.run(go())


def _read_replies_proc(args) -> list[float]:
    """Latency (ms) of every reply whose request id carries tag, on the given reply partitions."""
    bootstrap, topic, parts, tag, deadline = args
    import msgpack
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def go() -> list[float]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), enable_auto_commit=False, auto_offset_reset="latest")
        await c.start()
        lat: list[float] = []
        try:
            tps = [TopicPartition(topic, p) for p in parts]
            c.assign(tps)
            await c.seek_to_end(*tps)
            for tp in tps:  # resolve the end position now: replies produced from here on count
                await c.position(tp)
            pre = tag.encode()
            while time.time() < deadline:
                recs = await c.getmany(timeout_ms=200, max_records=5000)
                now = time.time_ns()
                for rs in recs.values():
                    for r in rs:
                        obj = msgpack.unpackb(r.value, raw=False)
                        rid = obj.get("request_id", "")
                        if rid.encode().startswith(pre) and obj.get("status") == "ok":
                            lat.append((now - int(rid.rsplit("-", 1)[1])) / 1e6)
        finally:
            await c.stop()
        return lat
    return asyncio.run(go())


class Counter:
    """Reply-topic end offsets, read by one long-lived consumer."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic

    async def __aenter__(self):
        from aiokafka import AIOKafkaConsumer, TopicPartition
        self.c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **kafka_options())
        await self.c.start()
        await self.c._client.force_metadata_update()  # noqa: SLF001 - know the new topic's partitions now
        self.tps = [TopicPartition(self.topic, p) for p in sorted(self.c.partitions_for_topic(self.topic) or ())]
        return self

    async def count(self) -> int:
        return sum((await self.c.end_offsets(self.tps)).values())

    async def __aexit__(self, *exc):
        await self.c.stop()


async def wait_replies(counter: Counter, base: int, n: int, timeout: float, marks=(0.2, 0.95)) -> dict:
    """Poll the reply count until n more replies exist; times at which each mark was passed."""
    t_mark: dict[float, float] = {}
    t0 = time.monotonic()
    last, last_t = base, t0
    while True:
        got = await counter.count() - base
        now = time.monotonic()
        for m in marks:
            if m not in t_mark and got >= m * n:
                t_mark[m] = now
        if got >= n:
            break
        if got != last:
            last, last_t = got, now
        elif now - last_t > timeout:
            raise SystemExit(f"no reply progress for {timeout:.0f} s at {got}/{n}")
        await asyncio.sleep(0.1)
    lo, hi = marks
    return {"replies": n, "rate": (hi - lo) * n / (t_mark[hi] - t_mark[lo]), "drain_s": now - t0}


def kafka_rows(args, model_dir: Path, store_dir: Path, tenants: list[str], db_url: str, bootstrap: str) -> dict:
    from tests.serving_harness import Topics, WorkerProcess
    from workers.kafka_admin import ensure_topics
    tag = f"ge{int(time.time())}"
    req, rep, dlq = f"bench.req.{tag}", f"bench.rep.{tag}", f"bench.dlq.{tag}"
    asyncio.run(ensure_topics(bootstrap, {req: (args.partitions, {}), rep: (args.partitions, {}), dlq: (1, {})}))
    # The worker as the tests run it (tests/serving_harness.WorkerProcess), with this bench's settings.
    extra = {"FLOCK_KAFKA_BOOTSTRAP": bootstrap, "FLOCK_DEVICE": os.environ.get("FLOCK_DEVICE", "auto"),
             "FLOCK_DEFAULT_BASE_MODEL": str(model_dir),
             "FLOCK_STORE_BACKEND": "filesystem", "FLOCK_STORE_DIR": str(store_dir),
             "FLOCK_BATCH_MAX_TOKENS": str(args.max_tokens), "FLOCK_BATCH_MAX_SEQS": str(args.max_seqs),
             "FLOCK_BATCH_MAX_TENANTS": str(args.max_seqs), "FLOCK_MAX_SEQ_LEN": "128", "FLOCK_TRUNCATE": "1",
             "FLOCK_ADAPTER_SLOTS": str(pool_slots(len(tenants))), "FLOCK_ADAPTER_LOAD_THREADS": "16",
             "FLOCK_COMMIT_INTERVAL_MS": "200", "FLOCK_PARTITION_HIGH_WATER": str(args.high_water),
             "FLOCK_PARTITION_LOW_WATER": str(args.high_water // 4)}
    if args.edges is not None:
        extra["FLOCK_EDGES"] = str(args.edges)
    worker = WorkerProcess(db_url, Topics(req, rep, dlq, args.partitions), tag, **extra)
    out: dict = {"partitions": args.partitions, "worker_log": str(worker.log_path)}

    # The backlog goes in before the worker starts, so producers never limit the measured rate.
    # Adapters load on first use; by 20 % of a uniform-tenant backlog every tenant has been seen
    # several times, so the measured window (20-95 % of the replies) is a warm drain.
    backlog = make_mix(args.backlog, tenants, seed=2)
    log(f"full system: producing a backlog of {len(backlog)} requests")
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.producers) as pool:
        pool.map(_produce_proc, [(bootstrap, req, backlog[k::args.producers], None, f"b{k}")
                                 for k in range(args.producers)])
    log(f"backlog produced in {time.time() - t0:.0f} s; starting the worker "
        f"(edges={args.edges if args.edges is not None else 'default'})")

    async def count_now() -> int:
        async with Counter(bootstrap, rep) as counter:
            return await counter.count()

    async def drain(base: int) -> dict:
        async with Counter(bootstrap, rep) as counter:
            return await wait_replies(counter, base, len(backlog), 300)
    try:
        base = asyncio.run(count_now())
        t_start = time.time()
        worker.start(timeout=600)
        log(f"worker ready in {time.time() - t_start:.0f} s")
        sat = asyncio.run(drain(base))
        log(f"full system: {sat['rate']:.0f} replies/s (drain {sat['drain_s']:.1f} s)")
        out["saturated"] = sat
        out["worker_metrics"] = scrape(worker)
        # Open loop at 70 % of the saturated rate.
        rate = args.open_fraction * sat["rate"]
        n = int(rate * args.open_seconds)
        items = make_mix(n, tenants, seed=3)
        log(f"open loop: {rate:.0f} req/s for {args.open_seconds:.0f} s ({n} requests)")
        deadline = time.time() + 5 + args.open_seconds + 15  # late replies count as missing
        readers = args.readers
        ctx = mp.get_context("spawn")
        with ctx.Pool(readers) as rpool, ctx.Pool(args.producers) as ppool:
            parts = list(range(args.partitions))
            rfut = rpool.map_async(_read_replies_proc, [(bootstrap, rep, parts[k::readers], "o", deadline)
                                                        for k in range(readers)])
            time.sleep(5)  # readers positioned at the end before the first request
            t0 = time.monotonic()
            ppool.map(_produce_proc, [(bootstrap, req, items[k::args.producers], rate / args.producers, f"o{k}")
                                      for k in range(args.producers)])
            sent_s = time.monotonic() - t0
            lats = [x for part in rfut.get() for x in part]
        lats.sort()

        def pct(q):
            return lats[min(len(lats) - 1, int(q / 100 * len(lats)))] if lats else float("nan")
        out["open_loop"] = {"rate": rate, "requests": n, "send_s": sent_s, "replied": len(lats),
                            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": lats[-1] if lats else None}
        log(f"open loop: {len(lats)}/{n} replied, p50 {pct(50):.1f} ms, p99 {pct(99):.1f} ms")
    finally:
        worker.terminate(timeout=90)
    return out


def scrape(worker) -> dict:
    """A few gauges/counters of the worker group, for where-the-time-goes notes."""
    status, body = worker.get("/metrics")
    if status != 200:
        return {}
    keep = {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if any(k in name for k in ("stage_cpu", "batch_seqs_sum", "batch_seqs_count", "engine_seconds_sum",
                                   "engine_seconds_count", "edges", "extensions")):
            keep[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="bert-base", help="'bert-base' (random 12 x 768) or a checkpoint directory")
    ap.add_argument("--tenants", type=int, default=10000)
    ap.add_argument("--work", default="/tmp/flock-gpu-e2e")
    ap.add_argument("--engine-requests", type=int, default=30000)
    ap.add_argument("--engine-seconds", type=float, default=10)
    ap.add_argument("--backlog", type=int, default=300000)
    ap.add_argument("--open-seconds", type=float, default=20)
    ap.add_argument("--open-fraction", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--max-seqs", type=int, default=1400)
    ap.add_argument("--high-water", type=int, default=20000)
    ap.add_argument("--partitions", type=int, default=32)
    ap.add_argument("--edges", type=int, default=None, help="FLOCK_EDGES for the worker (default: its own)")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--reg-procs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-kafka", action="store_true")
    args = ap.parse_args()

    from workers.config import settings
    s = settings()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_base(args.base, work)
    store_dir = work / "store"
    prefix = f"gpu{model_dir.name.lower().replace('_', '-')[:20]}"
    tenants = register_tenants(args.tenants, prefix, model_dir, store_dir, s.database_url, args.reg_procs)
    result: dict = {"base": str(model_dir), "tenants": len(tenants), "cpu_count": os.cpu_count(), "args": vars(args)}
    if not args.skip_engine:
        mix = make_mix(args.engine_requests, tenants, seed=0)
        result["engine"] = engine_rows(model_dir, store_dir, s.database_url, tenants, mix, args.max_tokens,
                                       args.max_seqs, args.engine_seconds)
        e = result["engine"]
        log(f"engine: forward {e['forward_seq_s']:.0f} seq/s, submit {e['submit_seq_s']:.0f} seq/s")
    if not args.skip_kafka:
        result["kafka"] = kafka_rows(args, model_dir, store_dir, tenants, s.database_url, s.kafka_bootstrap)

    fwd = result.get("engine", {}).get("forward_seq_s")
    rows = []
    if "engine" in result:
        rows.append(("forward pass (plans prebuilt)", fwd, 1.0, None, None))
        rows.append(("Engine.submit (outputs built)", result["engine"]["submit_seq_s"],
                     result["engine"]["submit_seq_s"] / fwd, None, None))
    if "kafka" in result:
        k = result["kafka"]
        rows.append(("full system, Kafka backlog", k["saturated"]["rate"],
                     k["saturated"]["rate"] / fwd if fwd else None, None, None))
        o = k["open_loop"]
        rows.append((f"open loop at {args.open_fraction:.0%}", o["replied"] / max(o["send_s"], 1e-9),
                     None, o["p50_ms"], o["p99_ms"]))
    print(f"\nbase {model_dir.name}, {len(tenants)} LoRA r8 (q,v) tenants, lengths 8-128 tokens, "
          f"{os.cpu_count()} cores\n")
    print(f"{'row':34s} {'seq/s':>9s} {'vs fwd':>7s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, rate, ratio, p50, p99 in rows:
        print(f"{name:34s} {rate:9.0f} {'' if ratio is None else f'{ratio:.2f}':>7s} "
              f"{'' if p50 is None else f'{p50:.1f}':>8s} {'' if p99 is None else f'{p99:.1f}':>8s}")
    result["rows"] = rows
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu_e2e-{model_dir.name}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
