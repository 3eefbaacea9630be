"""The data plane on the real services, with `flockserve worker run` as a real process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgpack
import pytest

from schema.messages import ErrorCode, Headers, InferRequest, header_map, now_ms
from tests.serving_harness import (WorkerProcess, collect, interleaved, make_tenants, make_topics, produce)

TEXTS = ["the central bank held rates steady", "a late goal won the final",
         "new phone launches with a faster chip and a brighter screen than last year's model",
         "budget cuts", "film festival opens tonight with a premiere of a long awaited drama " * 3]


@pytest.fixture(scope="module")
def tag():
    return f"w{int(time.time() * 1000) % 10**8}"


@pytest.fixture(scope="module")
def tenants(sessions, tag):
    return make_tenants(sessions, tag, 12)


@pytest.fixture(scope="module")
def topics(kafka_bootstrap, tag):
    return asyncio.run(make_topics(kafka_bootstrap, tag, partitions=3))


@pytest.fixture(scope="module")
def worker(database_url, topics, tag, tenants):
    w = WorkerProcess(database_url, topics, tag).start()
    yield w
    assert w.terminate() == 0, w.log_tail()


def _by_id(replies):
    out = {}
    for r in replies:
        out.setdefault(r.request_id, []).append(r)
    return out


def test_mixed_tenant_round_trip_equals_engine(kafka_bootstrap, database_url, sessions, topics, worker, tenants):
    reqs = [InferRequest(tenant_id=tenants[i % len(tenants)], text=TEXTS[i % len(TEXTS)]) for i in range(60)]
    reqs.append(InferRequest(tenant_id=tenants[0], text="first", text_pair="second segment"))
    asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
    want = {r.request_id for r in reqs}
    replies = _by_id(asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs})))
    assert want <= set(replies), worker.log_tail()

    # The engine's direct answers for the same inputs, computed here in-process.
    from workers.adapters.store import AdapterStore, make_backend
    from workers.engine.batch import RequestItem
    from workers.engine.runtime import Engine
    from workers.engine.tokenize import BatchTokenizer
    from workers.models import resolve_model_dir
    from workers.serving.adapter_source import StoreLoader

    model_dir = str(resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2"))
    store = AdapterStore(sessions, make_backend("postgres", None))
    engine = Engine(model_dir, StoreLoader(store, "sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    try:
        direct = engine.run(BatchTokenizer(model_dir).pack(
            [RequestItem(r.tenant_id, text=r.text, text_pair=r.text_pair, request_id=r.request_id) for r in reqs]))
    finally:
        engine.close()
    for req, d in zip(reqs, direct):
        got = replies[req.request_id][0]
        assert got.status is ErrorCode.OK and got.tenant_id == req.tenant_id
        assert got.outputs["label"] == d.label
        assert got.outputs["scores"] == pytest.approx(d.scores, rel=1e-4, abs=1e-5)
        assert got.adapter_version == 1 and got.worker_id == worker.env["FLOCK_WORKER_ID"]
    assert len({len(r[0].outputs["scores"]) for r in replies.values()}) > 1, "label counts should differ"


def test_poison_goes_to_dlq_while_good_messages_continue(kafka_bootstrap, topics, worker, tenants):
    good = [InferRequest(tenant_id=tenants[i % 3], text=f"good {i}") for i in range(30)]
    salvageable = InferRequest(tenant_id=tenants[0], text="x").to_wire()
    salvageable["input"] = {"token_ids": "not a list"}
    poison = [b"\xc1\xc1garbage", b"", msgpack.packb([1, 2, 3]), msgpack.packb({"schema_version": 1}),
              msgpack.packb(salvageable)]
    items = []
    for i, g in enumerate(good):
        items.append(g)
        if i % 6 == 0 and poison:
            items.append(poison.pop(0))
    unknown = InferRequest(tenant_id="no-such-tenant", text="who am i")
    oversize = InferRequest(tenant_id=tenants[1], text="word " * 2000)
    bad_ids = InferRequest(tenant_id=tenants[2], token_ids=[101, 10**9, 102])
    items += [unknown, oversize, bad_ids]
    asyncio.run(interleaved(kafka_bootstrap, topics.requests, items))

    want = {g.request_id for g in good} | {unknown.request_id, oversize.request_id, bad_ids.request_id,
                                            salvageable["request_id"]}
    replies = _by_id(asyncio.run(collect(kafka_bootstrap, topics.replies,
                                         lambda rs: want <= {r.request_id for r in rs})))
    assert want <= set(replies), worker.log_tail()
    assert all(replies[g.request_id][0].status is ErrorCode.OK for g in good)
    assert replies[unknown.request_id][0].status is ErrorCode.UNKNOWN_TENANT
    assert replies[oversize.request_id][0].status is ErrorCode.INPUT_TOO_LARGE
    assert replies[bad_ids.request_id][0].status is ErrorCode.INVALID_INPUT
    assert replies[salvageable["request_id"]][0].status is ErrorCode.MALFORMED

    dlq = asyncio.run(collect(kafka_bootstrap, topics.dlq, lambda rs: len(rs) >= 5, decode=False))
    assert len(dlq) == 5
    originals = {b"\xc1\xc1garbage", b"", msgpack.packb([1, 2, 3]), msgpack.packb({"schema_version": 1}),
                 msgpack.packb(salvageable)}
    assert {r.value or b"" for r in dlq} == originals  # the original bytes, untouched
    for r in dlq:
        h = header_map(r.headers)
        assert h[Headers.ERROR].startswith("malformed") and h[Headers.SOURCE].startswith(topics.requests + "/")
        # Every reason says what was wrong and shows the record's first bytes, never an empty tail.
        reason = h[Headers.ERROR]
        assert len(reason) > len("malformed: ") + 10 and not reason.rstrip().endswith(":"), reason
        head = (r.value or b"")[:16].hex(" ")
        assert f"first bytes: {head or '(empty)'}" in reason, reason
    garbage = next(header_map(r.headers)[Headers.ERROR] for r in dlq if r.value == b"\xc1\xc1garbage")
    assert garbage.startswith("malformed: not valid msgpack at byte 0 of 9: FormatError: byte 0xc1 "), garbage


def test_an_overflowing_tenant_gets_an_internal_reply_and_its_batch_is_answered(kafka_bootstrap, sessions, topics,
                                                                               worker, tenants, tag):
    """A delta that is finite but overflows (head weights near float32's max) makes NaN scores.
    Its requests are answered with a typed internal error; the other tenants' requests in the same
    batches are answered normally, and the partition's offsets move past them all."""
    import torch

    from tests.adapter_factory import MINILM, random_delta
    from workers.adapters.store import AdapterStore, make_backend
    from workers.models import base_dims
    from workers.tenants import TenantRegistry

    bad = f"{tag}-overflow"
    config = {"r": 4, "alpha": 8, "sites": ["q", "v"], "task": "seq_cls", "labels": ["a", "b"], "pooling": "mean"}
    dims = base_dims(MINILM)
    tensors = random_delta("lora", config, dims, seed=5)
    tensors["head.weight"] = torch.full((2, dims.hidden), 3e38) * torch.tensor([[1.0], [-1.0]])
    TenantRegistry(sessions).create(bad)
    AdapterStore(sessions, make_backend("postgres", None)).import_tensors(bad, "lora", config, tensors, MINILM)

    reqs = []
    for i in range(24):
        reqs.append(InferRequest(tenant_id=bad if i % 4 == 0 else tenants[i % 5], text=TEXTS[i % len(TEXTS)]))
    asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
    want = {r.request_id for r in reqs}
    replies = _by_id(asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs})))
    assert want <= set(replies), worker.log_tail()
    for r in reqs:
        got = replies[r.request_id][0]
        if r.tenant_id == bad:
            assert got.status is ErrorCode.INTERNAL, got
            assert "failed validation" in got.error_message and "finite" in got.error_message, got.error_message
        else:
            assert got.status is ErrorCode.OK, got
    assert "failed validation" in worker.log_tail()


def test_a_failing_loop_stops_the_worker_with_an_error(kafka_bootstrap, tag):
    """A loop that raises must not leave the worker ready and holding its partitions while it
    serves nothing: run() stops and raises, so whatever runs the worker restarts it."""
    from tests.adapter_factory import MINILM
    from workers.models import resolve_model_dir
    from workers.serving.tokens import IntakeTokenizer
    from workers.serving.worker import Worker, WorkerConfig, WorkerLoopError

    class BrokenTokenizer(IntakeTokenizer):  # fault injection: tokenisation raises
        def ids(self, reqs, max_len):
            raise RuntimeError("tokenizer broke")

    topics = asyncio.run(make_topics(kafka_bootstrap, f"{tag}-loop", partitions=1))
    cfg = WorkerConfig(f"w-{tag}-loop", kafka_bootstrap, topics.requests, topics.replies, topics.dlq,
                       f"grp-{tag}-loop", [0], shutdown_timeout_s=2.0)
    w = Worker(cfg, engine=None, tokenizer=BrokenTokenizer(str(resolve_model_dir(MINILM)), False))

    async def go():
        run = asyncio.create_task(w.run())
        while not w.ready:
            assert not run.done(), run
            await asyncio.sleep(0.05)
        await produce(kafka_bootstrap, topics.requests, [InferRequest(tenant_id="t", text="hello")])
        with pytest.raises(WorkerLoopError, match="tokenizer broke"):
            await asyncio.wait_for(run, 60)
        assert not w.ready

    asyncio.run(go())


def test_deadline_expiry_replies_expired_without_compute(kafka_bootstrap, topics, worker, tenants):
    past = [InferRequest(tenant_id=tenants[3], text="too late", deadline_ms=now_ms() - 1000) for _ in range(5)]
    fresh = InferRequest(tenant_id=tenants[3], text="in time", deadline_ms=now_ms() + 60_000)
    asyncio.run(produce(kafka_bootstrap, topics.requests, past + [fresh]))
    want = {r.request_id for r in past} | {fresh.request_id}
    replies = _by_id(asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs})))
    assert all(replies[r.request_id][0].status is ErrorCode.EXPIRED for r in past)
    assert all(replies[r.request_id][0].outputs is None for r in past)
    assert replies[fresh.request_id][0].status is ErrorCode.OK


def test_metrics_and_health_endpoints(worker):
    assert worker.get("/livez")[0] == 200 and worker.get("/readyz")[0] == 200
    assert worker.metric("flock_commits_total") > 0
    assert worker.metric("flock_batch_sequences_count") > 0
    assert worker.get("/nope")[0] == 404


@pytest.mark.restarts
def test_kill9_mid_stream_then_restart_loses_nothing(kafka_bootstrap, database_url, sessions, tenants, tag):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag + "k", partitions=3))
    reqs = [InferRequest(tenant_id=tenants[i % len(tenants)], text=TEXTS[i % len(TEXTS)]) for i in range(400)]
    w = WorkerProcess(database_url, topics, tag + "k", FLOCK_BATCH_MAX_SEQS="16").start()
    asyncio.run(produce(kafka_bootstrap, topics.requests, reqs))
    # Let it answer part of the stream, then kill it without warning.
    partial = asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: len(rs) >= 60, timeout=120))
    w.kill9()
    assert 60 <= len(partial) < len(reqs), "the kill should land mid-stream"
    w2 = WorkerProcess(database_url, topics, tag + "k", FLOCK_BATCH_MAX_SEQS="64").start()
    try:
        want = {r.request_id for r in reqs}
        replies = asyncio.run(collect(kafka_bootstrap, topics.replies,
                                      lambda rs: want <= {r.request_id for r in rs}, timeout=240))
    finally:
        assert w2.terminate() == 0
    dlq = asyncio.run(collect(kafka_bootstrap, topics.dlq, lambda rs: True, timeout=2, decode=False))
    got = {r.request_id for r in replies}
    lost = want - got
    assert not lost, f"{len(lost)} requests lost across kill -9"
    counts = Counter(r.request_id for r in replies)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"kill -9: {len(reqs)} requests, {len(replies)} replies, {duplicates} duplicates, {len(dlq)} DLQ")
    assert all(r.status is ErrorCode.OK for r in replies)
    assert duplicates < len(reqs)  # duplicates are bounded by what was in flight at the kill


@pytest.mark.parametrize("idle_dispatch", ["1", "0"])
def test_an_idle_engine_takes_queued_work_without_the_batch_wait(kafka_bootstrap, database_url, tenants, tag,
                                                                idle_dispatch):
    """A 20 s batch wait: with idle dispatch a lone request on an idle worker does not wait for it
    (queue time well under it); without, it waits the whole of it."""
    topics = asyncio.run(make_topics(kafka_bootstrap, f"{tag}i{idle_dispatch}", partitions=1))
    w = WorkerProcess(database_url, topics, f"{tag}i{idle_dispatch}", FLOCK_BATCH_MAX_WAIT_MS="20000",
                      FLOCK_BATCH_IDLE_DISPATCH=idle_dispatch).start()
    try:
        req = InferRequest(tenant_id=tenants[0], text=TEXTS[0])
        asyncio.run(produce(kafka_bootstrap, topics.requests, [req]))
        got = asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: any(r.request_id == req.request_id for r in rs),
                                  timeout=120))
        queue_ms = next(r for r in got if r.request_id == req.request_id).timings["queue_ms"]
        if idle_dispatch == "1":
            assert queue_ms < 10_000, queue_ms
        else:
            assert queue_ms >= 19_000, queue_ms
    finally:
        assert w.terminate() == 0


def test_backpressure_bounds_unreplied_requests(kafka_bootstrap, database_url, tenants, tag):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag + "b", partitions=1))
    high, low = 40, 10
    w = WorkerProcess(database_url, topics, tag + "b", FLOCK_PARTITION_HIGH_WATER=str(high),
                      FLOCK_PARTITION_LOW_WATER=str(low), FLOCK_BATCH_MAX_SEQS="8",
                      FLOCK_BATCH_MAX_WAIT_MS="1").start()
    try:
        flood = [InferRequest(tenant_id=tenants[i % 4], text=TEXTS[4]) for i in range(400)]
        asyncio.run(produce(kafka_bootstrap, topics.requests, flood))
        paused_seen = False
        deadline = time.time() + 240
        while time.time() < deadline:
            paused_seen |= (w.metric("flock_paused_partitions") or 0) > 0
            if (w.metric('flock_replies_total{status="ok"}') or 0) >= len(flood):
                break
            time.sleep(0.2)
        peak = w.metric("flock_inflight_requests_peak")
        assert (w.metric('flock_replies_total{status="ok"}') or 0) >= len(flood), w.log_tail()
        assert paused_seen, "the flood never paused the partition"
        assert peak is not None and peak <= 2 * high, f"{peak} unreplied requests held (high water {high})"
    finally:
        assert w.terminate() == 0


def test_adapter_upgrade_reaches_the_worker_within_the_poll_bound(kafka_bootstrap, sessions, topics, worker, tenants, tag):
    """With thousands of tenants registered, a new active version of one tenant is served within
    FLOCK_VERSION_POLL_S (+ a batch) of its import; the worker follows the change log
    (tests/test_versions.py asserts the poll reads no tenants table)."""
    from schema.tables import Tenant
    from tests.adapter_factory import MINILM, random_delta
    from workers.adapters.store import AdapterStore, make_backend
    from workers.config import Settings
    from workers.models import base_dims

    with sessions.begin() as s:
        s.execute(Tenant.__table__.insert(), [{"tenant_id": f"{tag}-idle-{i:04d}"} for i in range(3000)])
    t = tenants[0]
    store = AdapterStore(sessions, make_backend("postgres", None))
    rec = store.record(t)
    asked = InferRequest(tenant_id=t, text="before the upgrade")
    asyncio.run(produce(kafka_bootstrap, topics.requests, [asked]))
    got = asyncio.run(collect(kafka_bootstrap, topics.replies, lambda rs: any(r.request_id == asked.request_id for r in rs)))
    assert [r.adapter_version for r in got if r.request_id == asked.request_id] == [rec.version]

    config = {**rec.config, "labels": ["up", "down", "flat", "new"]}
    tensors = random_delta(rec.pet_type, config, base_dims(MINILM), seed=77)
    if rec.pet_type == "ia3":
        tensors = {k: (1 + v if k.endswith(".scale") else v) for k, v in tensors.items()}
    new = store.import_tensors(t, rec.pet_type, config, tensors, MINILM)
    upgraded_at = time.monotonic()
    bound = Settings().version_poll_s + 5.0
    while True:
        probe = InferRequest(tenant_id=t, text="after the upgrade")
        asyncio.run(produce(kafka_bootstrap, topics.requests, [probe]))
        reply = [r for r in asyncio.run(collect(kafka_bootstrap, topics.replies,
                                                lambda rs: any(r.request_id == probe.request_id for r in rs)))
                 if r.request_id == probe.request_id][0]
        if reply.adapter_version == new.version:
            break
        assert reply.adapter_version == rec.version
        assert time.monotonic() - upgraded_at < bound, worker.log_tail()
        time.sleep(0.5)
    assert reply.status is ErrorCode.OK and len(reply.outputs["scores"]) == 4


def test_static_worker_registers_and_reports_load(sessions, worker):
    """A worker on static partitions (no manager) still heartbeats its row with a load report:
    an owned partition not yet assigned to the consumer must not end the control-plane agent."""
    from schema.tables import Worker, WorkerState
    deadline = time.monotonic() + 30
    row = None
    while time.monotonic() < deadline:
        with sessions() as s:
            row = s.get(Worker, worker.env["FLOCK_WORKER_ID"])
            if row is not None and row.state == WorkerState.SERVING and "partitions" in row.metrics:
                break
        time.sleep(0.5)
    assert row is not None and row.state == WorkerState.SERVING, worker.log_tail()
    assert row.follows_leases is False and row.metrics["mode"] == "static"
    assert "Traceback" not in worker.log_tail(20000)
