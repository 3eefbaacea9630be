"""The msgspec fast path of the wire codec agrees with the exact (msgpack + field table) path:
same accept/reject, same values, same error code and message; batch entry points; reply bytes
identical to msgpack.packb."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from schema.messages import (MAX_MESSAGE_BYTES, ErrorCode, Headers, InferReply, InferRequest, WireError,
                             decode_requests, encode_replies)
from tests.test_wire import mutated_requests, pack, valid_obj


def outcome(fn, data):
    try:
        return "ok", fn(data)
    except WireError as e:
        return "err", (e.code, e.message, e.request_id, e.tenant_id, e.reply_to)


def exact(data):
    return InferRequest._decode_exact(data, MAX_MESSAGE_BYTES)


def same_as_exact(data):
    fast, ref = outcome(InferRequest.decode, data), outcome(exact, data)
    assert fast == ref, (data, fast, ref)
    if fast[0] == "ok":  # same Python types too (int stays int, list stays list)
        assert {k: type(v) for k, v in vars(fast[1]).items()} == {k: type(v) for k, v in vars(ref[1]).items()}
    return fast


@pytest.mark.parametrize("obj", [
    valid_obj(tenant_id="acme\n"),  # '$' would match before a final newline under re.search
    valid_obj(request_id="r-1\n"),
    valid_obj(reply_to="topic\n"),
    valid_obj(created_at_ms=3.0),  # integral float: accepted (exact path), becomes int
    valid_obj(created_at_ms=True),
    valid_obj(deadline_ms=2.5),
    valid_obj(deadline_ms=2**63),
    valid_obj(input={"token_ids": [1.0, 2]}),
    valid_obj(input={"token_ids": []}),
    valid_obj(input={"token_ids": [2**31]}),
    valid_obj(input={"text": None}),
    valid_obj(input={"text": "a", "text_pair": None}),
    valid_obj(input={}),
    valid_obj(input={"text": "é" * 100_000}),
    valid_obj(input={"text": "é" * 100_001}),
    valid_obj(input={"token_ids": list(range(8193))}),
    valid_obj(input=[]),
    valid_obj(reply_to=None, deadline_ms=None),
])
def test_fast_path_agrees_with_exact_on_edge_cases(obj):
    same_as_exact(pack(obj))


def test_fast_path_declines_what_only_the_exact_decoder_can_judge():
    ok = valid_obj(request_id="r-1")
    # map16 header holding a valid request: accepted (by the exact decoder)
    body = pack(ok)
    map16 = b"\xde\x00" + bytes([len(ok)]) + body[1:]
    assert same_as_exact(map16)[0] == "ok"
    # 65 entries of one repeated key: msgpack's map limit rejects it; msgspec alone would not
    dup = b"\xde\x00\x41" + b"".join(pack("tenant_id") + pack("acme") for _ in range(65))
    assert same_as_exact(dup)[0] == "err"
    inner = b"\xde\x00\x41" + b"".join(pack("text") + pack("x") for _ in range(65))
    whole = pack({k: v for k, v in ok.items() if k != "input"})
    crafted = bytes([whole[0] + 1]) + whole[1:] + pack("input") + inner
    assert same_as_exact(crafted)[0] == "err"
    # duplicates within the limit: last wins on both paths
    d2 = b"\x82" + pack("text") + pack("a") + pack("text") + pack("b")
    crafted = bytes([whole[0] + 1]) + whole[1:] + pack("input") + d2
    kind, req = same_as_exact(crafted)
    assert kind == "ok" and req.text == "b"
    # invalid UTF-8 and bin strings
    assert same_as_exact(body.replace(b"hello", b"hell\xff"))[0] == "err"
    assert same_as_exact(pack({**ok, "tenant_id": b"acme"}))[0] == "err"
    # non-bytes values
    for v in (None, bytearray(body), memoryview(body)):
        same_as_exact(v)


@hsettings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_requests())
def test_fuzz_fast_path_agrees_with_exact(obj):
    same_as_exact(pack(obj))


@hsettings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_fast_agrees_with_exact(data):
    same_as_exact(data)


def test_decode_requests_batch():
    good = InferRequest(tenant_id="acme", text="hi", request_id="r1")
    bad = pack(valid_obj(request_id="r2", tenant_id="acme", schema_version=2))
    out = decode_requests([good.encode(), bad, b"\xc1", None])
    assert out[0] == good
    assert isinstance(out[1], WireError) and out[1].code is ErrorCode.UNSUPPORTED_VERSION
    assert out[1].request_id == "r2" and out[1].tenant_id == "acme"
    assert isinstance(out[2], WireError) and out[2].message.startswith("not valid msgpack at byte 0")
    assert isinstance(out[3], WireError) and out[3].message == "message has no value (null)"


def replies():
    t = {"queue_ms": 1.5, "compute_ms": 2, "total_ms": 3.25}
    yield InferReply(request_id="r1", tenant_id="t", status=ErrorCode.OK, worker_id="w", timings=t,
                     outputs={"label": "pos", "scores": [0.25, 0.75], "labels": ["neg", "pos"]}, adapter_version=3)
    yield InferReply(request_id="r2", tenant_id="t", status=ErrorCode.OK, adapter_version=2**40,
                     outputs={"token_labels": ["O", "B"], "token_scores": [1, 0.5]})
    yield InferReply.error(ErrorCode.EXPIRED, "deadline passed", request_id="r3", tenant_id="t", worker_id="w")
    yield InferReply(request_id="r4", tenant_id="t", status=ErrorCode.OK, adapter_version=3.0, outputs={})


def test_reply_bytes_identical_to_msgpack_and_headers():
    for r in replies():
        obj = r.to_wire()
        if r.adapter_version == 3.0 and isinstance(r.adapter_version, float):
            obj["adapter_version"] = 3  # the exact path normalises integral floats
        assert r.encode() == msgpack.packb(obj, use_bin_type=True)
        assert r.headers() == [(Headers.REQUEST_ID, r.request_id.encode()), (Headers.TENANT_ID, b"t"),
                               (Headers.CONTENT_TYPE, b"application/vnd.flock.v1+msgpack"),
                               (Headers.SCHEMA_VERSION, b"1")]


@pytest.mark.parametrize("outputs", [{"scores": [math.nan]}, {"scores": [math.inf]}, {"bogus": 1},
                                     {"label": 3}, {"scores": [True]}, {"labels": ["a", 1]}])
def test_invalid_reply_raises_typed_error_and_batch_answers_internal(outputs):
    r = InferReply(request_id="r1", tenant_id="t", status=ErrorCode.OK, outputs=outputs, worker_id="w")
    with pytest.raises(WireError) as ei:
        r.encode()
    assert ei.value.code is ErrorCode.MALFORMED and ei.value.message.strip()
    good = next(replies())
    batch = [good, r]
    values, headers = encode_replies(batch)
    assert values[0] == good.encode() and headers[0] == good.headers()
    assert batch[0] is good and batch[1].status is ErrorCode.INTERNAL and batch[1].encode() == values[1]
    back = InferReply.decode(values[1])
    assert back.status is ErrorCode.INTERNAL and back.request_id == "r1" and back.worker_id == "w"
    assert back.error_message.startswith("reply failed validation: ")
    assert headers[1][:2] == [(Headers.REQUEST_ID, b"r1"), (Headers.TENANT_ID, b"t")]


def test_encode_replies_matches_one_by_one():
    rs = list(replies())
    values, headers = encode_replies(rs)
    assert values == [r.encode() for r in rs] and headers == [r.headers() for r in rs]
    assert [InferReply.decode(v) for v in values][:3] == rs[:3]
