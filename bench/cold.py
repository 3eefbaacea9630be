"""Cold misses benchmark (not a test; engine only, no Kafka/PostgreSQL, so it runs on the GPU host).

Zipf(1.0) requests over N registered LoRA tenants (r8 on q,v, 2 labels; 16 distinct random payloads
held as safetensors bytes, each tenant its own slot) with a device slot budget for S of them
(PoolConfig.default_slots, i.e. FLOCK_ADAPTER_SLOTS) and a pinned host tier for H. The loader does
what the store does after its database read: sha256 of the bytes, safetensors parse, delta check
against the base model ("from the store"; the PostgreSQL round trip is not in it). Batches are fed
as the worker feeds them: two in flight, and after each submit ``engine.prefetch`` of the tenants
of the next batches (the batcher's look-ahead, up to 256 tenants).

Measures, in one process:
  * miss latency: a batch with one tenant that is only in the pinned host tier, or not loaded at
    all (store), against the same batch all resident, one batch at a time; paired difference,
    p50/p99;
  * Zipf throughput (steady state, after a warm-up) with the resident hit rate at submit (device /
    pinned host / store), against the same stream over S tenants that are all resident.

    .venv/bin/python bench/cold.py --quick                        # CPU smoke: tiny model, small counts
    python bench/cold.py --device cuda --shape bert-base          # GPU host, 100k tenants, 10k slots
Prints a table and writes $OUT/cold_bench.json (OUT defaults to ./bench_out).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402

from schema.layout import BaseDims  # noqa: E402
from workers.adapters.blobs import sha256_hex  # noqa: E402
from workers.adapters.validate import check_delta, parse_safetensors  # noqa: E402
from workers.config import Settings  # noqa: E402
from workers.engine.batch import TenantDelta  # noqa: E402
from workers.engine.options import EngineOptions  # noqa: E402
from workers.engine.pool import PoolConfig  # noqa: E402
from workers.engine.runtime import Engine  # noqa: E402
from workers.engine.synthetic import random_delta, random_packed, save_random_bert  # noqa: E402

SHAPES = {"tiny": (64, 2, 4, 128), "minilm": (384, 6, 12, 1536), "bert-base": (768, 12, 12, 3072)}
PAYLOADS = 16
LOOKAHEAD_LIMIT = 256  # what the batcher's upcoming_tenants() gives by default
VOCAB = 30522


class StoreBytes:
    """Tenants' deltas as safetensors bytes; loading one is the store's work minus the database."""

    def __init__(self, dims: BaseDims, rank: int, dtype: torch.dtype):
        self.dims = dims
        self.blobs = []
        for k in range(PAYLOADS):
            d = random_delta(f"p{k}", "lora", dims, seed=k, r=rank)
            tensors = {n: t.to(dtype).contiguous() for n, t in sorted(d.tensors.items())}
            data = save_safetensors(tensors)
            self.blobs.append((d.config, data, sha256_hex(data)))
        self.tensor_bytes = sum(t.numel() * t.element_size() for t in parse_safetensors(self.blobs[0][1], 1 << 40).values())
        self.loads = 0

    def __call__(self, tid: str) -> TenantDelta:
        config, data, digest = self.blobs[int(tid.rsplit("-", 1)[1]) % PAYLOADS]
        if sha256_hex(data) != digest:
            raise ValueError("stored bytes fail their sha256")
        tensors = parse_safetensors(data, len(data))
        check_delta("lora", config, tensors, self.dims)
        self.loads += 1
        return TenantDelta(tid, 1, "lora", config, tensors)


def tid(i: int) -> str:
    return f"t-{i:06d}"


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    def __init__(self, a):
        self.a = a
        h, L, H, m = SHAPES[a.shape]
        self.dims = BaseDims(h, m, L, H)
        self.dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        self.model = save_random_bert(tempfile.mkdtemp(prefix="flock-cold-"), h, L, H, m, vocab=VOCAB, max_pos=512)
        self.store = StoreBytes(self.dims, a.rank, torch.float32)
        per_tenant = self.store.tensor_bytes * torch.empty((), dtype=self.dtype).element_size() // 4
        self.per_tenant = per_tenant
        cfg = PoolConfig(device_bytes=max(a.slots * per_tenant * 2, 1 << 30), host_bytes=int(a.host_tenants * per_tenant * 1.1),
                         default_slots=a.slots, load_threads=Settings().adapter_load_threads)
        self.eng = Engine(self.model, self.store, device=a.device, dtype=self.dtype, pool_config=cfg,
                          options=EngineOptions.from_settings(Settings()))
        self.pool = self.eng.pool
        self.rng = np.random.default_rng(a.seed)
        ranks = np.arange(1, a.tenants + 1, dtype=np.float64)
        self.zipf_p = ranks ** -a.zipf / np.sum(ranks ** -a.zipf)

    # ---- batches -------------------------------------------------------------------------------
    def lengths(self, n: int) -> list[int]:
        return [int(x) for x in np.clip(self.rng.lognormal(np.log(self.a.seq / 2), 0.5, n), 8, self.a.seq)]

    def stream(self, n_batches: int) -> list[list[int]]:
        """Tenant indices (Zipf ranks) of each batch's requests, in arrival order."""
        flat = self.rng.choice(self.a.tenants, size=n_batches * self.a.batch, p=self.zipf_p)
        return [flat[i * self.a.batch:(i + 1) * self.a.batch].tolist() for i in range(n_batches)]

    def packed(self, tenants: list[str]):
        return random_packed(tenants, self.lengths(len(tenants)), VOCAB, seed=int(self.rng.integers(1 << 30)))

    def warm(self, ids: list[str]) -> None:
        t0 = time.perf_counter()
        n = self.eng.prefetch(ids).result()
        print(f"[cold] prefetched {n} tenants in {time.perf_counter() - t0:.1f} s", flush=True)

    # ---- miss latency --------------------------------------------------------------------------
    def miss_latency(self) -> dict:
        """One batch at a time: all resident vs the same batch with request 0 cold (pinned host or
        store). Paired per trial."""
        a = self.a
        hot = [t for t in self.pool.recent(a.slots) if self.pool.tier(t) == "device"][: max(4 * a.batch, 64)]
        # Tenants far down the Zipf tail, never loaded: store misses; some of them loaded into the
        # host tier and dropped from the device: pinned-host misses.
        tail = [tid(i) for i in range(a.tenants - 1, 0, -1) if self.pool.tier(tid(i)) is None]
        store_ids, host_ids = tail[: a.trials], tail[a.trials: 2 * a.trials]
        self.eng.prefetch(host_ids).result()
        for t in host_ids:
            self.pool.evict(t)
        assert all(self.pool.tier(t) == "host" for t in host_ids), "host tier too small for the trials"
        out: dict[str, list[float]] = {"hit": [], "host": [], "store": []}
        added: dict[str, list[float]] = {"host": [], "store": []}
        for i in range(a.trials):
            others = [hot[j] for j in self.rng.choice(len(hot), a.batch - 1)]
            batch = self.packed([hot[int(self.rng.integers(len(hot)))]] + others)
            self.eng.run(batch)  # warm caches for this shape
            for kind, cold in (("host", host_ids[i]), ("store", store_ids[i])):
                assert self.pool.tier(cold) == ("host" if kind == "host" else None)
                sync(a.device)
                t0 = time.perf_counter()
                self.eng.run(batch)
                hit = time.perf_counter() - t0
                miss_batch = dataclasses.replace(batch, tenant_ids=[cold] + list(batch.tenant_ids[1:]))
                t0 = time.perf_counter()
                self.eng.run(miss_batch)
                miss = time.perf_counter() - t0
                out["hit"].append(hit * 1e3)
                out[kind].append(miss * 1e3)
                added[kind].append((miss - hit) * 1e3)
        return {"batch_ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in out.items()},
                "added_ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "max": max(v)} for k, v in added.items()},
                "trials": a.trials}

    # ---- throughput ----------------------------------------------------------------------------
    def run_stream(self, batches: list[list[str]], warmup: int, name: str) -> dict:
        """Feed like the worker: at most two batches in flight; after each submit, prefetch the
        tenants of the next ``lookahead`` batches. Counts where each request's tenant was at submit."""
        a = self.a
        packs = [self.packed(b) for b in batches]
        inflight: collections.deque = collections.deque()
        lat_hit, lat_miss = [], []
        tiers = collections.Counter()
        stats0 = t0 = None
        seqs = toks = 0
        for i, (b, p) in enumerate(zip(batches, packs)):
            if i == warmup:
                while inflight:
                    inflight.popleft()[0].result()
                sync(a.device)
                stats0, t0 = dict(self.pool.stats), time.perf_counter()
            while len(inflight) >= 2:
                inflight.popleft()[0].result()
            where = [self.pool.tier(t) or "store" for t in b]
            fut = self.eng.submit(p)
            upcoming = list(dict.fromkeys(t for nb in batches[i + 1:i + 1 + a.lookahead] for t in nb))
            if upcoming:
                self.eng.prefetch(upcoming[:LOOKAHEAD_LIMIT])
            if i >= warmup:
                tiers.update(where)
                seqs += p.num_seqs
                toks += int(p.cu_seqlens[-1])
                t_sub = time.perf_counter()
                cold = any(w != "device" for w in where)
                fut.add_done_callback(lambda f, t_sub=t_sub, cold=cold:
                                      (lat_miss if cold else lat_hit).append((time.perf_counter() - t_sub) * 1e3))
            inflight.append((fut, i))
        while inflight:
            inflight.popleft()[0].result()
        sync(a.device)
        el = time.perf_counter() - t0
        n = sum(tiers.values())
        st = {k: self.pool.stats[k] - stats0.get(k, 0) for k in self.pool.stats}
        r = {"name": name, "seconds": el, "seq_per_s": seqs / el, "tok_per_s": toks / el, "batches": len(batches) - warmup,
             "hit_rate": tiers["device"] / n, "from_host": tiers["host"] / n, "from_store": tiers["store"] / n,
             "batch_ms_all_resident": {"p50": pct(lat_hit, 50), "p99": pct(lat_hit, 99), "n": len(lat_hit)},
             "batch_ms_with_miss": {"p50": pct(lat_miss, 50), "p99": pct(lat_miss, 99), "n": len(lat_miss)},
             "pool": st}
        print(f"[cold] {name}: {r['seq_per_s']:,.0f} seq/s, resident at submit {r['hit_rate']:.3f} "
              f"(host {r['from_host']:.3f}, store {r['from_store']:.3f}), loads {st['loads']}, "
              f"uploads {st['uploads']}", flush=True)
        return r

    def throughput(self) -> dict:
        a = self.a
        ranks = self.stream(a.batches + a.warmup)
        # All resident: the same stream folded onto the S tenants that fit (same batch shapes, about
        # the same distinct tenants per batch), every one prefetched first.
        self.warm([tid(i) for i in range(a.slots)][::-1])
        resident = self.run_stream([[tid(r % a.slots) for r in b] for b in ranks], a.warmup, "all resident")
        # Zipf: start from the hottest S resident (steady state after the warm-up batches).
        self.warm([tid(i) for i in range(a.slots)][::-1])
        zipf = self.run_stream([[tid(r) for r in b] for b in ranks], a.warmup, f"zipf({a.zipf})")
        return {"all_resident": resident, "zipf": zipf, "ratio": zipf["seq_per_s"] / resident["seq_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, 2,000 tenants, 200 slots")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--slots", type=int, default=10_000, help="device slot budget (FLOCK_ADAPTER_SLOTS)")
    ap.add_argument("--host-tenants", type=int, default=None,
                    help="pinned host tier size, in tenants (default: all; torch rounds each pinned buffer up "
                         "to a power of two, so bert-base r8 takes ~1 MiB per tenant)")
    ap.add_argument("--no-host-warm", dest="host_warm", action="store_false",
                    help="start with a cold host tier (otherwise the hottest host-tenants are loaded first, as "
                         "a worker that has run for a while has them)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128, help="requests per batch")
    ap.add_argument("--seq", type=int, default=128, help="longest request (tokens); lengths lognormal below it")
    ap.add_argument("--batches", type=int, default=400, help="measured batches per throughput run")
    ap.add_argument("--warmup", type=int, default=100, help="unmeasured batches before each throughput run")
    ap.add_argument("--lookahead", type=int, default=2, help="batches the prefetch looks ahead")
    ap.add_argument("--trials", type=int, default=100, help="paired trials per miss kind")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.quick:
        a.shape, a.tenants, a.slots = "tiny", 2000, 200
        a.batch, a.seq, a.batches, a.warmup, a.trials = 16, 32, 60, 20, 20
    a.host_tenants = a.tenants if a.host_tenants is None else a.host_tenants
    torch.manual_seed(a.seed)
    b = Bench(a)
    try:
        if a.host_warm:  # host tier: the hottest host-tenants (passing through the device slots)
            b.warm([tid(i) for i in range(min(a.host_tenants, a.tenants) - 2 * a.trials)][::-1])
        b.warm([tid(i) for i in range(a.slots)][::-1])  # the hottest S, hottest last (most recent)
        lat = b.miss_latency()
        thr = b.throughput()
    finally:
        b.eng.close()
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    cfg = {k: getattr(a, k) for k in ("shape", "tenants", "slots", "host_tenants", "host_warm", "rank", "zipf", "batch",
                                      "seq", "batches", "warmup", "lookahead", "trials", "quick")}
    result = {"device": dev, "dtype": str(b.dtype), "config": cfg, "adapter_bytes": b.per_tenant,
              "miss_latency": lat, "throughput": thr}
    out = os.environ.get("OUT", "./bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cold_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    z, r = thr["zipf"], thr["all_resident"]
    print(f"\n{dev}, {b.dtype}, {a.shape}: {a.tenants:,} tenants, {a.slots:,} slots, host tier {a.host_tenants:,}, "
          f"LoRA r{a.rank} ({b.per_tenant / 1024:.0f} KiB), batch {a.batch} x <= {a.seq} tokens"
          + ("  [--quick: smoke numbers]" if a.quick else ""))
    print(f"{'':34}{'p50':>10}{'p99':>10}")
    print(f"{'batch, all resident (ms)':34}{lat['batch_ms']['hit']['p50']:>10.2f}{lat['batch_ms']['hit']['p99']:>10.2f}")
    for k, label in (("host", "from pinned host"), ("store", "from the store")):
        print(f"{'miss ' + label + ', added (ms)':34}{lat['added_ms'][k]['p50']:>10.2f}{lat['added_ms'][k]['p99']:>10.2f}")
    print(f"{'':34}{'seq/s':>10}{'resident':>10}{'host':>8}{'store':>8}")
    for row in (r, z):
        print(f"{row['name']:34}{row['seq_per_s']:>10,.0f}{row['hit_rate']:>10.3f}{row['from_host']:>8.3f}"
              f"{row['from_store']:>8.3f}")
    print(f"{'throughput zipf / all resident':34}{thr['ratio']:>10.3f}   (goal >= 0.9; miss from host p99 goal <= 2 ms)")
    print(f"{'batch with a miss, p50/p99 (ms)':34}{z['batch_ms_with_miss']['p50']:>10.2f}"
          f"{z['batch_ms_with_miss']['p99']:>10.2f}  vs all resident {z['batch_ms_all_resident']['p50']:.2f}/"
          f"{z['batch_ms_all_resident']['p99']:.2f} (n={z['batch_ms_with_miss']['n']}/{z['batch_ms_all_resident']['n']})")


if __name__ == "__main__":
    main()
