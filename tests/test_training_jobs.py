"""Training jobs over Kafka (issue 12, item 2): the flock.train contract, and `flockserve trainer`
on the real services -- a job ends succeeded with a registered version whose served outputs equal
the trainer's evaluation outputs; a poisoned job fails cleanly; a trainer that dies mid-job is
retried at most FLOCK_TRAIN_MAX_ATTEMPTS times, then the job fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import torch
import msgpack
import pytest

from schema.messages import ErrorCode, WireError
from schema.train import (MAX_JOB_BYTES, FailureCode, JobStatus, TrainJob, TrainReply, json_schema)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_json_schema  # noqa: E402


def _job(**kw) -> TrainJob:
    base = dict(job_id="job-1", tenant_id="acme", pet_type="lora", config={"r": 4, "sites": ["q", "v"]},
                options={"epochs": 2, "learning_rate": 1e-3, "labels": ["a", "b"]},
                data={"rows": [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}]},
                reply_to="team.train-replies")
    return TrainJob(**{**base, **kw})


# ---------------------------------------------------------------- the contract
def test_job_and_reply_round_trip():
    job = _job(validation={"uri": "pg-lo://1234"})
    assert TrainJob.decode(job.encode()) == job
    assert job.data_source() == "inline:2 rows" and job.data_source("validation") == "pg-lo://1234"
    for uri in ("file:///data/x.csv", "/data/x.jsonl"):
        assert TrainJob.decode(_job(data={"uri": uri, "format": "csv"}).encode()).data["uri"] == uri
    reply = TrainReply(job_id="job-1", tenant_id="acme", status=JobStatus.SUCCEEDED, attempts=1, adapter_version=3,
                       metrics={"accuracy": 0.9, "per_label": {"a": {"support": 3}}})
    assert TrainReply.decode(reply.encode()) == reply


@pytest.mark.parametrize("mutate, code, words", [
    (lambda o: o.update(data={"uri": "https://example.com/x.csv"}), ErrorCode.MALFORMED, "fetches nothing over the network"),
    (lambda o: o.update(data={"uri": "s3://bucket/x.csv"}), ErrorCode.MALFORMED, "not a local path"),
    (lambda o: o.update(data={"rows": [], "uri": "/x.csv"}), ErrorCode.MALFORMED, "must hold exactly rows | uri"),
    (lambda o: o.update(data={"rows": ["text"]}), ErrorCode.MALFORMED, "data.rows[0] must be a map"),
    (lambda o: o.update(pet_type="prefix"), ErrorCode.MALFORMED, "'pet_type' must be one of"),
    (lambda o: o["options"].update(epochs=0), ErrorCode.MALFORMED, "'options.epochs' out of range"),
    (lambda o: o["options"].update(warp=9), ErrorCode.MALFORMED, "unknown field options.'warp'"),
    (lambda o: o.update(config={"r": float("nan")}), ErrorCode.MALFORMED, "non-finite"),
    (lambda o: o.pop("data"), ErrorCode.MALFORMED, "missing field 'data'"),
    (lambda o: o.update(schema_version=2), ErrorCode.UNSUPPORTED_VERSION, "schema_version 2"),
    (lambda o: o.update(data={"rows": [{"text": "x" * 1000, "label": "a"}] * 1100}), ErrorCode.INPUT_TOO_LARGE,
     "send large data sets by uri"),
])
def test_bad_jobs_get_typed_errors_with_the_job_salvaged(mutate, code, words):
    obj = _job().to_wire()
    mutate(obj)
    with pytest.raises(WireError) as ei:
        TrainJob.decode(msgpack.packb(obj, use_bin_type=True))
    assert ei.value.code is code and words in ei.value.message, ei.value.message
    # the trainer can still record the job as failed and answer it
    assert (ei.value.request_id, ei.value.tenant_id, ei.value.reply_to) == ("job-1", "acme", "team.train-replies")


def test_encode_refuses_an_invalid_or_oversize_job():
    with pytest.raises(WireError):
        _job(options={"batch_size": -1}).encode()
    rows = [{"text": "y" * 500, "label": "a"}] * (MAX_JOB_BYTES // 500 + 10)
    with pytest.raises(WireError) as ei:
        _job(data={"rows": rows}).encode()
    assert ei.value.code is ErrorCode.INPUT_TOO_LARGE


@pytest.mark.parametrize("kind", ["train_job", "train_reply"])
def test_committed_json_schema_equals_python_definitions(kind):
    committed = gen_json_schema.path_of(kind).read_text()
    assert committed == gen_json_schema.render(kind), \
        f"schema/{gen_json_schema.path_of(kind).name} is stale: run python scripts/gen_json_schema.py"
    jsonschema.Draft202012Validator.check_schema(json.loads(committed))


def test_json_schema_agrees_with_the_decoder():
    v = jsonschema.Draft202012Validator(json_schema("job"))
    good = _job().to_wire()
    assert v.is_valid(good)
    for bad in ({**good, "pet_type": "nope"}, {**good, "data": {"uri": "http://x"}},
                {**good, "data": {"rows": [{"text": "a"}], "uri": "/x"}}, {**good, "bogus": 1}):
        assert not v.is_valid(bad)
        with pytest.raises(WireError):
            TrainJob.decode(msgpack.packb(bad, use_bin_type=True))
    r = TrainReply(job_id="j", tenant_id="t", status=JobStatus.FAILED, attempts=3,
                   code=FailureCode.ATTEMPTS_EXHAUSTED, reason="died").to_wire()
    assert jsonschema.Draft202012Validator(json_schema("reply")).is_valid(r)


# ---------------------------------------------------------------- on the real services
import asyncio  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

POS = ["a wonderful film", "great acting and a great story", "i loved it", "superb and moving", "a joy to watch",
       "brilliant work", "excellent in every way", "really good fun"]
NEG = ["a dreadful film", "terrible acting and a dull story", "i hated it", "boring and empty", "a chore to watch",
       "awful work", "bad in every way", "really poor stuff"]
ROWS = [{"text": t, "label": "pos"} for t in POS] + [{"text": t, "label": "neg"} for t in NEG]
FAST = {"epochs": 1, "batch_size": 8, "max_length": 32, "val_split": 0.25, "seed": 1}


@pytest.fixture()
def train_env(kafka_bootstrap, database_url, unique, tmp_path, monkeypatch):
    """Own topics and trainer group per test; FLOCK_* set for in-process and subprocess trainers."""
    from workers.config import settings
    from workers.kafka_admin import ensure_topics
    env = {"FLOCK_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOCK_DATABASE_URL": database_url,
           "FLOCK_TRAIN_TOPIC": f"flock.train.t{unique}", "FLOCK_TRAIN_REPLIES_TOPIC": f"flock.train.r{unique}",
           "FLOCK_TRAINER_GROUP": f"trainers-{unique}", "FLOCK_STORE_DIR": str(tmp_path / "blobs"),
           "FLOCK_TRAIN_PROGRESS_S": "0.2"}
    asyncio.run(ensure_topics(kafka_bootstrap, {env["FLOCK_TRAIN_TOPIC"]: (2, {}),
                                                env["FLOCK_TRAIN_REPLIES_TOPIC"]: (1, {})}))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings.cache_clear()
    yield env
    settings.cache_clear()


def _tenant(sessions, name: str) -> str:
    from workers.tenants import TenantRegistry
    TenantRegistry(sessions).create(name, None)
    return name


def _replies(env, n: int, timeout: float = 60.0) -> list[TrainReply]:
    from aiokafka import AIOKafkaConsumer

    from workers.kafka_conn import kafka_options

    async def read():
        c = AIOKafkaConsumer(env["FLOCK_TRAIN_REPLIES_TOPIC"], bootstrap_servers=env["FLOCK_KAFKA_BOOTSTRAP"], **kafka_options(),
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        out, deadline = [], time.monotonic() + timeout
        try:
            while len(out) < n and time.monotonic() < deadline:
                for recs in (await c.getmany(timeout_ms=500)).values():
                    out += [TrainReply.decode(r.value) for r in recs]
        finally:
            await c.stop()
        return out
    return asyncio.run(read())


def _run_trainer(max_jobs: int, on_result=None) -> int:
    from workers.trainer.jobs import Trainer
    t = Trainer("cpu", max_jobs=max_jobs, on_result=on_result)
    asyncio.run(asyncio.wait_for(t.run(), 600))
    return t.done


def test_job_through_the_topic_serves_what_the_trainer_evaluated(train_env, sessions, unique, minilm_dir):
    from workers.adapters.store import AdapterStore, make_backend
    from workers.config import settings
    from workers.engine.batch import PackedBatch
    from workers.engine.runtime import Engine
    from workers.serving.adapter_source import StoreLoader
    from workers.trainer.jobs import JobTable, submit

    tenant = _tenant(sessions, f"jobs-ok-{unique}")
    job = TrainJob(job_id=f"ok-{unique}", tenant_id=tenant, pet_type="lora", config={"r": 4}, options=FAST,
                   data={"rows": ROWS})
    asyncio.run(submit(job))
    results = []
    assert _run_trainer(1, on_result=results.append) == 1
    row = JobTable().get(job.job_id)
    assert row.state == "succeeded" and row.attempts == 1 and row.adapter_version == 1, row
    assert {"accuracy", "macro_f1", "per_label"} <= set(row.metrics) and row.finished_at is not None
    assert row.progress["step"] == row.progress["steps"] > 0 and row.data_source == "inline:16 rows"
    [reply] = _replies(train_env, 1)
    assert reply.ok and reply.job_id == job.job_id and reply.adapter_version == 1
    assert reply.metrics["accuracy"] == row.metrics["accuracy"]

    # served outputs: the registered version loaded as a worker loads it, through the engine
    [res] = results
    s = settings()
    store = AdapterStore(sessions, make_backend("postgres", s.store_dir), models_dir=s.models_dir)
    loader = StoreLoader(store, s.default_base_model)
    ids = [torch.tensor(x) for x in res.eval_token_ids]
    cu = torch.tensor([0] + [len(x) for x in ids]).cumsum(0)
    tt = torch.cat([torch.tensor(x) for x in res.eval_token_type_ids]) if res.eval_token_type_ids else None
    eng = Engine(str(minilm_dir), loader, device="cpu")
    try:
        outs = eng.run(PackedBatch(torch.cat(ids), cu, [tenant] * len(ids), tt, list(range(len(ids)))), timeout=300)
    finally:
        eng.close()
    served = torch.stack([torch.as_tensor(o.logits, dtype=torch.float32) for o in outs])
    assert torch.allclose(served, res.eval_logits.float(), atol=1e-4), (served - res.eval_logits).abs().max()


@pytest.mark.parametrize("kind, data, code, words", [
    ("unknown-label", {"rows": ROWS[:4] + [{"text": "meh", "label": "neutral"}]}, FailureCode.INVALID_DATA,
     "labels not in the label set"),
    ("wrong-columns", {"rows": [{"sentence": t, "label": "pos"} for t in POS]}, FailureCode.INVALID_DATA,
     "missing column(s) ['text']"),
    ("empty-file", None, FailureCode.INVALID_DATA, "the data set is empty"),
    ("missing-lo", {"uri": "pg-lo://987654"}, FailureCode.INVALID_DATA, "pg-lo://987654"),
])
def test_poisoned_job_fails_cleanly(train_env, sessions, unique, tmp_path, kind, data, code, words):
    from workers.adapters.store import AdapterStore, make_backend
    from workers.trainer.jobs import JobTable, submit

    tenant = _tenant(sessions, f"jobs-bad-{unique}")
    if data is None:
        (tmp_path / "empty.jsonl").write_text("")
        data = {"uri": f"file://{tmp_path / 'empty.jsonl'}"}
    job = TrainJob(job_id=f"{kind}-{unique}", tenant_id=tenant, pet_type="bitfit", options={**FAST, "labels": ["pos", "neg"]},
                   data=data)
    asyncio.run(submit(job))
    assert _run_trainer(1) == 1
    row = JobTable().get(job.job_id)
    assert row.state == "failed" and row.code == code.value and words in row.reason, row
    [reply] = _replies(train_env, 1)
    assert reply.status is JobStatus.FAILED and reply.code is code and words in reply.reason
    assert AdapterStore(sessions, make_backend("postgres", tmp_path)).list(tenant) == []  # nothing registered


def test_undecodable_jobs_fail_or_go_to_the_dlq(train_env, sessions, unique):
    """A job naming its id and tenant is recorded failed and answered; nameless bytes go to the DLQ."""
    from aiokafka import AIOKafkaProducer

    from workers.kafka_conn import kafka_options
    from workers.trainer.jobs import JobTable

    bad = {**_job(job_id=f"bad-{unique}", tenant_id=f"t-{unique}").to_wire(), "pet_type": "prefix-tuning"}
    bad["reply_to"] = None

    async def send():
        p = AIOKafkaProducer(bootstrap_servers=train_env["FLOCK_KAFKA_BOOTSTRAP"], **kafka_options())
        await p.start()
        try:
            await p.send_and_wait(train_env["FLOCK_TRAIN_TOPIC"], msgpack.packb(bad), key=b"x")
        finally:
            await p.stop()
    asyncio.run(send())
    assert _run_trainer(1) == 1
    row = JobTable().get(f"bad-{unique}")
    assert row.state == "failed" and row.code == "invalid_job" and "'pet_type' must be one of" in row.reason
    [reply] = _replies(train_env, 1)
    assert reply.code is FailureCode.INVALID_JOB


@pytest.mark.restarts
def test_a_job_that_kills_the_trainer_is_retried_then_failed(train_env, sessions, unique, kafka_bootstrap):
    """A real SIGKILL mid-training (fault hook), twice; FLOCK_TRAIN_MAX_ATTEMPTS=2: the third
    trainer marks the job failed without training it, replies, and commits."""
    from workers.trainer.jobs import CRASH_ENV, JobTable, submit

    tenant = _tenant(sessions, f"jobs-crash-{unique}")
    job = TrainJob(job_id=f"crash-{unique}", tenant_id=tenant, pet_type="ia3", options=FAST, data={"rows": ROWS})
    asyncio.run(submit(job))
    env = {**os.environ, **train_env, "FLOCK_TRAIN_MAX_ATTEMPTS": "2"}
    cmd = [sys.executable, "-m", "workers.cli", "trainer", "--max-jobs", "1"]
    for attempt in (1, 2):
        p = subprocess.run(cmd, env={**env, CRASH_ENV: "1"}, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == -9, p.stderr[-2000:]  # SIGKILLed mid-job
        row = JobTable().get(job.job_id)
        assert row.state == "running" and row.attempts == attempt, row
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = JobTable().get(job.job_id)
    assert row.state == "failed" and row.code == "attempts_exhausted" and row.attempts == 2, row
    assert "stopped 2 times" in row.reason
    [reply] = _replies(train_env, 1)
    assert reply.code is FailureCode.ATTEMPTS_EXHAUSTED and reply.attempts == 2
    # the offset is committed: a fourth trainer finds nothing to do
    out = subprocess.run([sys.executable, "-m", "workers.cli", "job", "list", "--tenant", tenant, "--json"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert [j["state"] for j in json.loads(out.stdout)] == ["failed"]


@pytest.mark.restarts
def test_a_retried_job_can_succeed(train_env, sessions, unique):
    """One crash, then a healthy trainer: the job succeeds on attempt 2 (counted in the row)."""
    from workers.trainer.jobs import CRASH_ENV, JobTable, submit

    tenant = _tenant(sessions, f"jobs-retry-{unique}")
    job = TrainJob(job_id=f"retry-{unique}", tenant_id=tenant, pet_type="bitfit", options=FAST, data={"rows": ROWS})
    asyncio.run(submit(job))
    env = {**os.environ, **train_env, CRASH_ENV: "2"}
    p = subprocess.run([sys.executable, "-m", "workers.cli", "trainer", "--max-jobs", "1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert _run_trainer(1) == 1
    row = JobTable().get(job.job_id)
    assert row.state == "succeeded" and row.attempts == 2 and row.adapter_version == 1, row


def test_data_from_a_large_object_and_a_file(train_env, sessions, unique, tmp_path, database_url):
    """pg-lo://<oid> training data and a CSV validation file (format from the suffix)."""
    from workers.db import sync_engine
    from workers.trainer.jobs import JobTable, submit

    raw = sync_engine(database_url).raw_connection()
    try:
        lo = raw.lobject(0, "wb")
        lo.write("\n".join(json.dumps(r) for r in ROWS).encode())
        oid = lo.oid
        lo.close()
        raw.commit()
    finally:
        raw.close()
    val = tmp_path / "val.csv"
    val.write_text("text,label\nwhat a great film,pos\nwhat a dull film,neg\n")
    tenant = _tenant(sessions, f"jobs-lo-{unique}")
    job = TrainJob(job_id=f"lo-{unique}", tenant_id=tenant, pet_type="bitfit", options=FAST,
                   data={"uri": f"pg-lo://{oid}"}, validation={"uri": f"file://{val}"})
    asyncio.run(submit(job))
    assert _run_trainer(1) == 1
    row = JobTable().get(job.job_id)
    assert row.state == "succeeded", row
    assert row.data_source == f"pg-lo://{oid}" and row.spec["validation"] == f"file://{val}"
    assert sum(v["support"] for v in row.metrics["per_label"].values()) == 2  # evaluated on the file
