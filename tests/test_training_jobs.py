"""Training jobs over Kafka (issue 12, item 2): the flock.train contract, and `flockserve trainer`
on the real services -- a job ends succeeded with a registered version whose served outputs equal
the trainer's evaluation outputs; a poisoned job fails cleanly; a trainer that dies mid-job is
retried at most FLOCK_TRAIN_MAX_ATTEMPTS times, then the job fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
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
