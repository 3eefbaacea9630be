"""Coordinated batcher and offset bookkeeping: pure policy, checked exhaustively."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings, strategies as st

from workers.serving.batcher import BatchPolicy, CoordinatedBatcher, Pending
from workers.serving.offsets import OffsetTracker


def P(tenant, n=10, t=0.0, deadline=None):
    return Pending(tenant, n, t, deadline)


def test_token_budget_and_sequence_cap():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=100, max_seqs=5, max_wait_ms=1e9))
    for i in range(20):
        b.add(P(f"t{i}", 30))
    assert b.ready(0)
    batch, _ = b.next_batch(0)
    assert sum(p.n_tokens for p in batch) <= 100 and len(batch) == 3
    b2 = CoordinatedBatcher(BatchPolicy(max_tokens=10**6, max_seqs=5, max_wait_ms=1e9))
    for i in range(20):
        b2.add(P("t", 1))
    assert len(b2.next_batch(0)[0]) == 5


def test_bounded_wait():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=1000, max_wait_ms=10))
    b.add(P("a", 5, t=100.0))
    assert not b.ready(105) and b.wait_ms(105) == 5
    assert b.ready(110)


def test_hot_tenant_cannot_starve_others():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=10**6, max_seqs=10, max_wait_ms=0))
    for i in range(1000):
        b.add(P("hot", 10, t=i * 0.001))
    for j in range(5):
        b.add(P(f"cold{j}", 10, t=5.0))
    batch, _ = b.next_batch(10)
    tenants = Counter(p.tenant_id for p in batch)
    assert all(tenants[f"cold{j}"] == 1 for j in range(5)), tenants
    assert tenants["hot"] == 5


def test_distinct_tenant_cap():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=10**6, max_seqs=100, max_tenants=4, max_wait_ms=0))
    for j in range(10):
        b.add(P(f"t{j}", 1))
    assert len({p.tenant_id for p in b.next_batch(0)[0]}) == 4


def test_earliest_deadline_first_and_expiry():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=10**6, max_seqs=2, max_wait_ms=0))
    b.add(P("late", deadline=5000.0))
    b.add(P("soon", deadline=1000.0))
    b.add(P("gone", deadline=50.0))
    b.add(P("none"))
    batch, expired = b.next_batch(100.0)
    assert [p.tenant_id for p in expired] == ["gone"]
    assert {p.tenant_id for p in batch} == {"soon", "late"}
    assert b.upcoming_tenants() == ["none"]


def test_length_aware_fill_skips_what_does_not_fit():
    b = CoordinatedBatcher(BatchPolicy(max_tokens=100, max_seqs=100, max_wait_ms=0))
    b.add(P("a", 90, t=0))
    b.add(P("b", 60, t=1))
    b.add(P("c", 10, t=2))
    batch, _ = b.next_batch(10)
    assert [p.tenant_id for p in batch] == ["c", "a"]  # b did not fit; batch sorted by length
    b2 = CoordinatedBatcher(BatchPolicy(max_tokens=100, max_wait_ms=0))
    b2.add(P("huge", 500))
    assert [p.n_tokens for p in b2.next_batch(0)[0]] == [500]  # oversize runs alone, never stuck


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 200), st.one_of(st.none(), st.floats(0, 2000))),
                max_size=120), st.integers(50, 1000), st.integers(1, 40))
def test_every_request_comes_out_exactly_once(items, budget, max_seqs):
    b = CoordinatedBatcher(BatchPolicy(max_tokens=budget, max_seqs=max_seqs, max_tenants=3, max_wait_ms=0))
    for i, (t, n, d) in enumerate(items):
        b.add(Pending(f"t{t}", n, float(i), d, payload=i))
    seen = []
    now = 1000.0
    while len(b):
        batch, expired = b.next_batch(now)
        assert batch or expired
        assert len(batch) <= max_seqs and len({p.tenant_id for p in batch}) <= 3
        assert len(batch) == 1 or sum(p.n_tokens for p in batch) <= budget
        assert all(p.deadline_ms is not None and p.deadline_ms <= now for p in expired)
        seen += [p.payload for p in batch + expired]
    assert sorted(seen) == list(range(len(items)))
    assert b.queued_tokens == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.randoms())
def test_offsets_commit_only_contiguous_done_prefix(parts, rnd):
    tr = OffsetTracker()
    next_off = Counter()
    records = []
    for p in parts:
        records.append((p, next_off[p]))
        tr.track(p, next_off[p])
        next_off[p] += 1
    done = set()
    order = records[:]
    rnd.shuffle(order)
    for p, o in order[: rnd.randint(0, len(order))]:
        tr.done(p, o)
        done.add((p, o))
        for part, commit in tr.to_commit().items():
            # every offset below the commit point is done; the commit point itself is not
            assert all((part, x) in done for x in range(commit))
            assert commit == next_off[part] or (part, commit) not in done
        tr.mark_committed(tr.to_commit())
    if len(done) == len(records):
        tr.mark_committed(tr.to_commit())
        assert all(tr._parts[p].committed == next_off[p] for p in next_off)
        assert tr.pending() == 0


def test_remove_gives_back_one_partitions_queued_work():
    b = CoordinatedBatcher(BatchPolicy(max_wait_ms=0))
    for i in range(10):
        b.add(Pending(f"t{i % 3}", 5, float(i), None, payload=i % 2))  # payload = partition
    gone = b.remove(lambda p: p.payload == 1)
    assert len(gone) == 5 and len(b) == 5 and b.queued_tokens == 25
    batch, _ = b.next_batch(100)
    assert {p.payload for p in batch} == {0}
