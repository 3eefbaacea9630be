"""Adapter pool (eviction, pinning, reload, versions, prefetch), per-tenant failure isolation,
async submit, and launch count independent of tenant count."""

import numpy as np
import pytest
import torch

from workers.engine.batch import PackedBatch
from workers.engine.errors import AdapterLoadError, PoolExhausted, UnknownTenant
from workers.engine.plan import build_plan
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine
from workers.engine import heads

from .conftest import Reference, check_outputs, dims_of, random_batch, random_delta


def _deltas(model_dir, n, pets=("lora",), seed=0, **kw):
    rng = np.random.default_rng(seed)
    dims = dims_of(model_dir)
    return {f"t{i}": random_delta(f"t{i}", pets[i % len(pets)], dims, rng, **kw) for i in range(n)}


def _batch_for(tenants, seed=0):
    return random_batch(tenants, np.random.default_rng(seed), vocab=120, seqs_per_tenant=(1, 2))


def test_eviction_and_reload_give_identical_outputs(tiny_bert_dir):
    deltas = _deltas(tiny_bert_dir, 12, pets=("lora", "adapter", "bitfit", "ia3", "diff", "maskbert"))
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu",
                 pool_config=PoolConfig(default_slots=6, host_bytes=1))  # tiny host tier: reload from loader
    try:
        first = _batch_for([f"t{i}" for i in range(6)])
        a = eng.run(first)
        eng.run(_batch_for([f"t{i}" for i in range(6, 12)], seed=1))  # 6-slot banks: evicts by LRU
        assert eng.pool.stats["evictions"] >= 1
        for i in range(6):  # and the rest (diff/maskbert are only bounded by bytes) explicitly
            eng.pool.evict(f"t{i}")
        assert not any(f"t{i}" in eng.pool.residents for i in range(6))
        b = eng.run(first)
    finally:
        eng.close()
    for x, y in zip(a, b):
        assert x.error is None and (x.scores == y.scores and x.token_scores == y.token_scores)
        assert x.logits == y.logits


def test_pinned_slots_are_not_evicted(tiny_bert_dir):
    deltas = _deltas(tiny_bert_dir, 5, r=4, sites=["q", "v"], n_labels=3)
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu", pool_config=PoolConfig(default_slots=4))
    try:
        held = eng.pool.acquire(["t0", "t1", "t2", "t3"])
        got = eng.pool.acquire(["t4"])
        assert isinstance(got["t4"], PoolExhausted)
        eng.pool.release(list(held.values()))
        got = eng.pool.acquire(["t4"])
        assert not isinstance(got["t4"], Exception)
        assert "t0" not in eng.pool.residents  # the LRU unpinned tenant went
        eng.pool.release([got["t4"]])
    finally:
        eng.close()


def test_bad_tenants_fail_only_their_requests(tiny_bert_dir):
    deltas = _deltas(tiny_bert_dir, 6, pets=("lora", "bitfit"))
    broken = _deltas(tiny_bert_dir, 1, pets=("adapter",), seed=9)["t0"]
    broken.tensors[next(k for k in broken.tensors if k.endswith("down.weight"))] = torch.zeros(3, 3)

    def loader(tid):
        if tid == "ghost":
            raise KeyError(tid)
        if tid == "broken":
            return broken
        if tid == "exploding":
            raise RuntimeError("store down")
        return deltas[tid]
    batch = _batch_for(list(deltas) + ["ghost", "broken", "exploding"], seed=3)
    eng = Engine(tiny_bert_dir, loader, device="cpu")
    try:
        outs = eng.submit(batch).result(60)
    finally:
        eng.close()
    errs = {o.tenant_id: type(o.error) for o in outs if o.error is not None}
    assert errs == {"ghost": UnknownTenant, "broken": AdapterLoadError, "exploding": AdapterLoadError}
    good = [i for i, t in enumerate(batch.tenant_ids) if t in deltas]
    cu = batch.cu_seqlens.tolist()
    sub = PackedBatch(torch.cat([batch.input_ids[cu[i]:cu[i + 1]] for i in good]),
                      torch.tensor([0] + list(np.cumsum([cu[i + 1] - cu[i] for i in good]))),
                      [batch.tenant_ids[i] for i in good],
                      torch.cat([batch.token_type_ids[cu[i]:cu[i + 1]] for i in good]))
    check_outputs([outs[i] for i in good], sub, deltas, Reference(tiny_bert_dir))


def test_new_version_after_invalidate_and_prefetch(tiny_bert_dir):
    deltas = _deltas(tiny_bert_dir, 3, pets=("ia3",))
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu")
    try:
        assert eng.prefetch(["t0", "t1", "t2"]).result(60) == 3
        batch = _batch_for(["t0", "t1"])
        a = eng.run(batch)
        assert eng.pool.stats["device_hits"] >= 2 and all(o.adapter_version == 1 for o in a)
        new = _deltas(tiny_bert_dir, 1, pets=("ia3",), seed=5)["t0"]
        new.version = 2
        deltas["t0"] = new
        eng.invalidate("t0")
        b = eng.run(batch)
    finally:
        eng.close()
    for x, y in zip(a, b):
        if x.tenant_id == "t0":
            assert y.adapter_version == 2 and x.logits != y.logits
        else:
            assert x.logits == y.logits


def _count_ops(eng, batch):
    got = eng.pool.acquire(batch.tenant_ids)
    residents = [got[t] for t in batch.tenant_ids]
    plan = build_plan(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, residents, 0,
                      torch.device("cpu"), False)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hidden = eng.encoder.forward(plan)
        pooled = heads.pool_hidden(hidden, plan, eng.encoder.base.pooler_w, eng.encoder.base.pooler_b)
        for hg in plan.heads:
            if hg.seq_order:
                heads.seq_logits(hg, pooled)
            if hg.tok_order:
                heads.token_logits(hg, hidden)
    eng.pool.release(set(got.values()))
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_launch_count_independent_of_tenant_count(tiny_bert_dir):
    """Same sequences, 4 vs 60 distinct tenants of LoRA/adapter/BitFit/IA3 (same banks): same op count."""
    n_seqs = 60
    rng = np.random.default_rng(0)
    dims = dims_of(tiny_bert_dir)
    pets = ("lora", "adapter", "bitfit", "ia3")
    kw = {"lora": dict(r=4, sites=["q", "v", "ffn_out"]), "adapter": dict(variant="houlsby", bottleneck=8, activation="relu")}
    deltas = {}
    for i in range(n_seqs):
        p = pets[i % 4]
        d = random_delta(f"t{i}", p, dims, rng, task="seq_cls", pooling="cls", n_labels=3, **kw.get(p, {}))
        deltas[f"t{i}"] = d
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu")
    try:
        lens = rng.integers(3, 30, size=n_seqs)
        ids = torch.from_numpy(rng.integers(1, 120, size=int(lens.sum())))
        cu = torch.tensor([0] + list(np.cumsum(lens)))
        few = PackedBatch(ids, cu, [f"t{i % 4}" for i in range(n_seqs)])
        many = PackedBatch(ids, cu, [f"t{i}" for i in range(n_seqs)])
        n_few, n_many = _count_ops(eng, few), _count_ops(eng, many)
    finally:
        eng.close()
    assert n_few == n_many, (n_few, n_many)


def test_submit_is_async_and_ordered(tiny_bert_dir):
    deltas = _deltas(tiny_bert_dir, 8, pets=("lora", "bitfit"))
    eng = Engine(tiny_bert_dir, lambda t: deltas[t], device="cpu")
    try:
        batches = [_batch_for([f"t{(i + k) % 8}" for k in range(3)], seed=i) for i in range(5)]
        futs = [eng.submit(b) for b in batches]
        for b, f in zip(batches, futs):
            outs = f.result(60)
            assert [o.tenant_id for o in outs] == b.tenant_ids
            assert [o.request_id for o in outs] == b.request_ids
            assert all(o.timings["total_ms"] >= 0 for o in outs)
    finally:
        eng.close()


def test_cold_misses_load_in_parallel_with_the_same_outputs(tiny_bert_dir):
    """A batch's cold tenants load on the pool's loader threads; the answers equal a serial pool's,
    and a failing load still fails only its own tenant."""
    import threading
    deltas = _deltas(tiny_bert_dir, 10, pets=("lora", "adapter", "bitfit", "ia3"))
    threads: set[str] = set()

    def loader(t):
        threads.add(threading.current_thread().name)
        if t == "bad":
            raise OSError("store unreachable")
        return deltas[t]
    batch = _batch_for([f"t{i}" for i in range(10)] + ["bad"])
    outs = {}
    for n in (1, 4):
        eng = Engine(tiny_bert_dir, loader, device="cpu", pool_config=PoolConfig(load_threads=n))
        try:
            outs[n] = eng.run(batch)
        finally:
            eng.close()
    assert any(name.startswith("flock-load") for name in threads)
    for serial, parallel in zip(outs[1], outs[4]):
        assert (serial.error is None) == (parallel.error is None)
        if serial.tenant_id == "bad":
            assert isinstance(parallel.error, AdapterLoadError)
        else:
            assert serial.error is None and serial.scores == parallel.scores and serial.logits == parallel.logits


def test_host_copy_is_one_allocation_and_counts_its_footprint(tiny_bert_dir):
    """Each PET type's host copy packs its float tensors (bank or sparse part and head) into one
    buffer, and nbytes is what that holds; pinned, the allocator's power-of-two rounding counts."""
    from workers.engine.convert import host_footprint, to_host

    dims = dims_of(tiny_bert_dir)
    for pet, delta in _deltas(tiny_bert_dir, 6, pets=("lora", "adapter", "bitfit", "ia3", "diff", "maskbert")).items():
        hd = to_host(delta, dims, torch.float32, pin=False, has_pooler=True)
        parts = [d for d in (hd.bank_tensors, hd.head_tensors, hd.sparse) if d]
        floats = [t for d in parts for t in d.values() if t.is_floating_point()]
        assert len({t.untyped_storage().data_ptr() for t in floats}) == 1, pet
        own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for d in parts for t in d.values()}
        assert hd.nbytes == sum(own.values()), pet
    assert host_footprint(146 * 1024, pinned=True) == 256 * 1024
    assert host_footprint(256 * 1024, pinned=True) == 256 * 1024
    assert host_footprint(146 * 1024, pinned=False) == 146 * 1024
