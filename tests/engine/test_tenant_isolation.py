"""Tenant isolation, as a property: whatever the mix of tenants in a batch, and across eviction,
reload and adapter version upgrades, a request is served with its own tenant's current adapter
and head — never a neighbour's, never a mix of versions.

Each tenant's label names carry its id and version, so a wrong head or a stale version shows up
in the label itself; the scores must equal those of the same request run alone on a separate
engine that only ever saw that tenant's current version.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.engine.conftest import dims_of, random_delta
from workers.engine.batch import PackedBatch
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine

TENANTS = [f"iso-{i}" for i in range(8)]
PETS = ["lora", "lora", "adapter", "bitfit", "ia3", "lora", "diff", "maskbert"]

ops = st.lists(st.one_of(
    st.tuples(st.just("batch"), st.lists(st.integers(0, 7), min_size=1, max_size=10)),
    st.tuples(st.just("upgrade"), st.integers(0, 7)),
    st.tuples(st.just("evict"), st.integers(0, 7)),
), min_size=3, max_size=10)


class Versions:
    """The 'store': each tenant's current delta; upgrades make a new version."""

    def __init__(self, dims, seed: int):
        self.dims, self.rng = dims, np.random.default_rng(seed)
        self.current = {t: self._make(t, 1) for t in TENANTS}

    def _make(self, tid: str, version: int):
        pet = PETS[TENANTS.index(tid)]
        d = random_delta(tid, pet, self.dims, self.rng, task="seq_cls", n_labels=3)
        d.version = version
        d.config["labels"] = [f"{tid}/v{version}/{j}" for j in range(3)]
        return d

    def upgrade(self, tid: str) -> None:
        self.current[tid] = self._make(tid, self.current[tid].version + 1)

    def load(self, tid: str):
        return self.current[tid]


def _batch(tids: list[str], rng) -> PackedBatch:
    lens = rng.integers(3, 20, size=len(tids))
    ids = torch.as_tensor(rng.integers(1, 100, size=int(lens.sum())))
    cu = torch.zeros(len(tids) + 1, dtype=torch.int64)
    cu[1:] = torch.as_tensor(lens).cumsum(0)
    return PackedBatch(ids, cu, tids)


def _alone(dims_dir, delta, ids) -> list[float]:
    ref = Engine(dims_dir, lambda t: delta, device="cpu")
    try:
        out = ref.run(PackedBatch(ids, torch.tensor([0, ids.numel()]), [delta.tenant_id]))[0]
    finally:
        ref.close()
    assert out.error is None
    return out.scores


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops, st.integers(0, 2**16))
def test_requests_only_ever_see_their_own_current_adapter(tiny_bert_dir, steps, seed):
    rng = np.random.default_rng(seed)
    store = Versions(dims_of(tiny_bert_dir), seed)
    # Few slots per bank: mixed batches force evictions and reloads.
    engine = Engine(tiny_bert_dir, store.load, device="cpu", pool_config=PoolConfig(default_slots=3))
    try:
        for op, arg in steps:
            if op == "upgrade":
                store.upgrade(TENANTS[arg])
                engine.invalidate(TENANTS[arg])
                continue
            if op == "evict":
                engine.pool.evict(TENANTS[arg])
                continue
            tids = [TENANTS[i] for i in arg]
            batch = _batch(tids, rng)
            outs = engine.run(batch)
            for b, (tid, out) in enumerate(zip(tids, outs)):
                if out.error is not None:
                    # Only a full pool may refuse, and only with its typed error.
                    assert type(out.error).__name__ == "PoolExhausted", out.error
                    continue
                cur = store.current[tid]
                assert out.tenant_id == tid
                assert out.adapter_version == cur.version
                assert out.label in cur.config["labels"], (tid, out.label)
                ids = batch.input_ids[int(batch.cu_seqlens[b]):int(batch.cu_seqlens[b + 1])]
                alone = _alone(tiny_bert_dir, cur, ids)
                assert np.allclose(out.scores, alone, rtol=1e-4, atol=1e-6), (tid, out.scores, alone)
    finally:
        engine.close()
