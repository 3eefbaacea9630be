"""A worker as a process group (engine process + edge processes) on the real services:
kill -9 of an edge or of the engine process loses nothing; metrics and probes cover the group."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest

from schema.messages import ErrorCode, InferRequest
from tests.serving_harness import WorkerProcess, collect, make_tenants, make_topics, produce

TEXTS = ["the central bank held rates steady", "a late goal won the final", "budget cuts",
         "new phone launches with a faster chip and a brighter screen than last year's model"]


@pytest.fixture(scope="module")
def tag():
    return f"g{int(time.time() * 1000) % 10**8}"


@pytest.fixture(scope="module")
def tenants(sessions, tag):
    return make_tenants(sessions, tag, 6)


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def edges_of(w: WorkerProcess) -> list[int]:
    """The edge processes (python -m workers.serving.edge) of a worker group."""
    out = []
    for c in children(w.proc.pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"workers.serving.edge" in f.read():
                    out.append(c)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _check_all_answered(kafka_bootstrap, topics, reqs, timeout=240):
    want = {r.request_id for r in reqs}
    replies = asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs},
                                  timeout=timeout))
    lost = want - {r.request_id for r in replies}
    assert not lost, f"{len(lost)} requests lost"
    assert all(r.status is ErrorCode.OK for r in replies)
    counts = Counter(r.request_id for r in replies)
    return sum(c - 1 for c in counts.values())


def test_group_serves_with_merged_metrics(kafka_bootstrap, database_url, tenants, tag):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag + "m", partitions=4))
    w = WorkerProcess(database_url, topics, tag + "m", FLOCK_EDGES="2").start()
    try:
        assert len(edges_of(w)) == 2
        reqs = [InferRequest(tenant_id=tenants[i % len(tenants)], text=TEXTS[i % len(TEXTS)]) for i in range(200)]
        asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
        assert _check_all_answered(kafka_bootstrap, topics, reqs) == 0
        deadline = time.time() + 10
        while time.time() < deadline and (w.metric('flock_replies_total{status="ok"}') or 0) < len(reqs):
            time.sleep(0.2)
        # Both edges' counters arrive summed at the group's one endpoint.
        assert w.metric('flock_replies_total{status="ok"}') == len(reqs)
        assert w.metric("flock_engine_batch_sequences_count") > 0
        assert w.metric('flock_stage_cpu_seconds_total{stage="engine"}') > 0
        assert w.metric('flock_stage_cpu_seconds_total{stage="decode"}') > 0
        status, body = w.get("/metrics")
        assert 'flock_kafka_client_info{aiokafka="' in body and 'c_extensions="yes"' in body
        assert w.get("/readyz")[0] == 200 and w.get("/livez")[0] == 200
    finally:
        assert w.terminate() == 0, w.log_tail()
    assert not any(alive(p) for p in edges_of(w))


@pytest.mark.restarts
def test_edge_kill9_is_restarted_and_loses_nothing(kafka_bootstrap, database_url, tenants, tag):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag + "e", partitions=4))
    w = WorkerProcess(database_url, topics, tag + "e", FLOCK_EDGES="2", FLOCK_BATCH_MAX_SEQS="16").start()
    try:
        reqs = [InferRequest(tenant_id=tenants[i % len(tenants)], text=TEXTS[i % len(TEXTS)]) for i in range(400)]
        asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
        asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: len(rs) >= 40, timeout=120))
        victim = edges_of(w)[0]
        os.kill(victim, signal.SIGKILL)
        duplicates = _check_all_answered(kafka_bootstrap, topics, reqs)
        print(f"edge kill -9: {len(reqs)} requests, {duplicates} duplicates")
        assert duplicates < len(reqs)
        assert w.proc.poll() is None, "the engine process must survive an edge's death"
        assert victim not in edges_of(w) and len(edges_of(w)) == 2, "the edge should have been restarted"
        assert (w.metric("flock_edge_restarts_total") or 0) >= 1
        deadline = time.time() + 30
        while time.time() < deadline and w.get("/readyz")[0] != 200:
            time.sleep(0.2)
        assert w.get("/readyz")[0] == 200
    finally:
        assert w.terminate() == 0, w.log_tail()


@pytest.mark.restarts
def test_engine_process_kill9_takes_the_group_down_then_restart_loses_nothing(kafka_bootstrap, database_url,
                                                                              tenants, tag):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag + "x", partitions=4))
    w = WorkerProcess(database_url, topics, tag + "x", FLOCK_EDGES="2", FLOCK_BATCH_MAX_SEQS="16").start()
    reqs = [InferRequest(tenant_id=tenants[i % len(tenants)], text=TEXTS[i % len(TEXTS)]) for i in range(400)]
    asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
    partial = asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: len(rs) >= 40, timeout=120))
    edges = edges_of(w)
    os.kill(w.proc.pid, signal.SIGKILL)  # the engine process only, not its process group
    w.proc.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in edges):
        time.sleep(0.1)
    assert not any(alive(p) for p in edges), "edges must not outlive their engine process"
    assert len(partial) < len(reqs), "the kill should land mid-stream"
    w2 = WorkerProcess(database_url, topics, tag + "x", FLOCK_EDGES="2").start()
    try:
        duplicates = _check_all_answered(kafka_bootstrap, topics, reqs)
        print(f"engine kill -9: {len(reqs)} requests, {duplicates} duplicates")
        assert duplicates < len(reqs)
    finally:
        assert w2.terminate() == 0, w2.log_tail()
