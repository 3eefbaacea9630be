"""The engine host's merge of edge batches (pure logic): round-robin across edges, caps kept,
and the shared-memory slot ring round trip."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import numpy as np

from workers.serving.group import edge_count, edge_of, merge_round_robin
from workers.serving.ipc import SlotLayout, SlotRing, pack_works


def batch(name: str, tokens: int, seqs: int):
    return SimpleNamespace(name=name, ids=np.zeros(tokens, np.int32), tenant_index=np.zeros(seqs, np.int32))


def test_busy_edge_does_not_crowd_out_a_quiet_one():
    busy = deque(batch(f"a{i}", 100, 10) for i in range(10))
    quiet = deque([batch("b0", 100, 10)])
    picks = merge_round_robin([busy, quiet], 0, cap_tokens=250, cap_seqs=1000)
    assert [q.name for _, q in picks] == ["a0", "b0"]  # a1 would exceed the token cap
    picks = merge_round_robin([busy, deque()], 1, cap_tokens=10_000, cap_seqs=25)
    assert [q.name for _, q in picks] == ["a1", "a2"]  # the sequence cap holds too


def test_round_robin_starts_where_told_and_interleaves():
    qs = [deque(batch(f"e{e}-{i}", 10, 1) for i in range(3)) for e in range(3)]
    picks = merge_round_robin(qs, 2, cap_tokens=60, cap_seqs=100)
    assert [q.name for _, q in picks] == ["e2-0", "e0-0", "e1-0", "e2-1", "e0-1", "e1-1"]


def test_an_oversized_first_batch_still_runs_alone():
    picks = merge_round_robin([deque([batch("big", 500, 1), batch("next", 1, 1)])], 0, cap_tokens=100, cap_seqs=10)
    assert [q.name for _, q in picks] == ["big"]


def test_partitions_map_to_edges_stably():
    parts = [0, 2, 5, 7, 9]
    assert [edge_of(p, parts, 2) for p in parts] == [0, 1, 0, 1, 0]
    assert edge_count("3") == 3 and edge_count("0") == 0
    assert edge_count("auto", cores=2) == 0 and edge_count("auto", cores=16) == 15 and edge_count("auto", 64) == 16


def test_slot_ring_round_trip_across_attachments():
    works = [SimpleNamespace(token_ids=[101, 7, 102], token_type_ids=None, request=SimpleNamespace(tenant_id="t1")),
             SimpleNamespace(token_ids=[101, 9, 9, 102], token_type_ids=[0, 0, 1, 1],
                             request=SimpleNamespace(tenant_id="t0")),
             SimpleNamespace(token_ids=[101, 102], token_type_ids=None, request=SimpleNamespace(tenant_id="t1"))]
    b = pack_works(works)
    assert b.tenants == ["t1", "t0"] and b.tenant_index.tolist() == [0, 1, 0]
    assert b.cu_seqlens.tolist() == [0, 3, 7, 9] and b.token_type_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    owner = SlotRing(SlotLayout(slots=2, max_tokens=16, max_seqs=4), create=True)
    try:
        edge = SlotRing(owner.layout, name=owner.name)
        ids, tt, cu, ten = edge.views(1)
        ids[:9], tt[:9], cu[:4], ten[:3] = b.input_ids, b.token_type_ids, b.cu_seqlens, b.tenant_index
        got = owner.read(1, 3, 9, True)
        assert [x.tolist() for x in got] == [b.input_ids.tolist(), b.token_type_ids.tolist(), [0, 3, 7, 9], [0, 1, 0]]
        ids[0] = 5  # the engine's copy does not change when the edge reuses the slot
        assert got[0][0] == 101
        del ids, tt, cu, ten
        edge.close()
    finally:
        owner.close(unlink=True)
