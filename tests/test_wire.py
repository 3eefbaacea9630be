"""Wire contract: round trips, strict typed errors, JSON Schema parity, decoder fuzzing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from schema.messages import (CONTENT_TYPE, MAX_MESSAGE_BYTES, MAX_TEXT_CHARS, ErrorCode, Headers,
                             InferReply, InferRequest, WireError, header_map, json_schema)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gen_json_schema  # noqa: E402


def valid_obj(**over):
    obj = InferRequest(tenant_id="acme", text="hello").to_wire()
    obj.update(over)
    return obj


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_request_round_trip_all_input_kinds():
    for req in (InferRequest(tenant_id="t-1", text="hi", deadline_ms=5, reply_to="my.replies"),
                InferRequest(tenant_id="t-1", text="a", text_pair="b"),
                InferRequest(tenant_id="t.2", token_ids=[101, 7592, 102])):
        back = InferRequest.decode(req.encode())
        assert back == req
        h = header_map(req.headers())
        assert h[Headers.REQUEST_ID] == req.request_id and h[Headers.TENANT_ID] == req.tenant_id
        assert h[Headers.CONTENT_TYPE] == CONTENT_TYPE and h[Headers.SCHEMA_VERSION] == "1"


def test_reply_round_trip_ok_and_error():
    ok = InferReply(request_id="r1", tenant_id="t", status=ErrorCode.OK,
                    outputs={"label": "pos", "scores": [0.1, 0.9], "labels": ["neg", "pos"]},
                    adapter_version=3, worker_id="w1", timings={"queue_ms": 1.5, "compute_ms": 2.0})
    assert InferReply.decode(ok.encode()) == ok
    bad = InferReply.error(ErrorCode.UNKNOWN_TENANT, "no such tenant", request_id="r2", tenant_id="x")
    back = InferReply.decode(bad.encode())
    assert back.status is ErrorCode.UNKNOWN_TENANT and back.error_message == "no such tenant"
    assert back.to_wire()["error"] == {"code": "unknown_tenant", "message": "no such tenant"}


@pytest.mark.parametrize("mutate, code", [
    (lambda o: o.pop("tenant_id"), ErrorCode.MALFORMED),
    (lambda o: o.update(tenant_id="Upper Case"), ErrorCode.MALFORMED),
    (lambda o: o.update(extra=1), ErrorCode.MALFORMED),
    (lambda o: o.update(schema_version=2), ErrorCode.UNSUPPORTED_VERSION),
    (lambda o: o.update(schema_version=True), ErrorCode.MALFORMED),
    (lambda o: o.update(input={"text": "a", "token_ids": [1]}), ErrorCode.MALFORMED),
    (lambda o: o.update(input={"text_pair": "a"}), ErrorCode.MALFORMED),
    (lambda o: o.update(input={"token_ids": [1, -1]}), ErrorCode.MALFORMED),
    (lambda o: o.update(input={"text": "x" * (MAX_TEXT_CHARS + 1)}), ErrorCode.INPUT_TOO_LARGE),
    (lambda o: o.update(deadline_ms="soon"), ErrorCode.MALFORMED),
    (lambda o: o.update(reply_to="bad topic!"), ErrorCode.MALFORMED),
])
def test_strict_decoding_gives_typed_errors_and_salvages_reply_address(mutate, code):
    obj = valid_obj(request_id="req-1", reply_to="r.topic")
    mutate(obj)
    with pytest.raises(WireError) as ei:
        InferRequest.decode(pack(obj))
    assert ei.value.code is code
    if "request_id" in obj:
        assert ei.value.request_id == "req-1"


def test_size_cap_and_garbage():
    with pytest.raises(WireError) as ei:
        InferRequest.decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert ei.value.code is ErrorCode.INPUT_TOO_LARGE
    for junk in (b"", b"\xc1", b"\x81\xa1", pack([1, 2]), pack({1: 2}), pack(b"bytes")):
        with pytest.raises(WireError) as ei:
            InferRequest.decode(junk)
        assert ei.value.code is ErrorCode.MALFORMED


# Every msgpack failure says what was wrong, where (byte offset) and what the bytes start with;
# msgpack's own FormatError/StackError text is empty, which once left DLQ reasons blank.
MSGPACK_REASON = re.compile(r"^not valid msgpack at byte \d+ of \d+: \w+: \S.*; first bytes: \S")


@pytest.mark.parametrize("junk, where, what", [
    (b"\xc1\xc1garbage", "at byte 0 of 9", "byte 0xc1 is not a valid msgpack type"),
    (pack({"a": 1})[:-1] + b"\xc1", "at byte 3 of 4", "byte 0xc1 is not a valid msgpack type"),
    (b"hello world", "at byte 1 of 11", "trailing bytes"),
    (b"", "at byte 0 of 0", "input ends inside a value"),
    (pack([1, 2, 3])[:-1], "at byte 3 of 3", "input ends inside a value"),
    (b"\x91" * 5000, "of 5000", "nested too deeply"),
    (b"\xa2\xff\xfe", "of 3", "utf-8"),
])
def test_garbage_reason_names_offset_and_first_bytes(junk, where, what):
    with pytest.raises(WireError) as ei:
        InferRequest.decode(junk)
    msg = ei.value.message
    assert ei.value.code is ErrorCode.MALFORMED and MSGPACK_REASON.match(msg), msg
    assert where in msg and what in msg, msg
    assert msg.endswith(junk[:16].hex(" ") + (" …" if len(junk) > 16 else "") if junk else "(empty)"), msg


@pytest.mark.parametrize("kind", ["request", "reply"])
def test_committed_json_schema_equals_python_definitions(kind):
    committed = gen_json_schema.path_of(kind).read_text()
    assert committed == gen_json_schema.render(kind), \
        f"schema/{gen_json_schema.path_of(kind).name} is stale: run python scripts/gen_json_schema.py"
    jsonschema.Draft202012Validator.check_schema(json.loads(committed))


# ------------------------------------------------------------------ fuzzing
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=12), c, max_size=4)),
                      max_leaves=12)
field_names = st.sampled_from(["schema_version", "request_id", "tenant_id", "input", "created_at_ms",
                               "deadline_ms", "reply_to", "text", "token_ids", "bogus"])
input_maps = st.dictionaries(st.sampled_from(["text", "text_pair", "token_ids", "x"]),
                             st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 2**32), max_size=5), values),
                             max_size=3)


@st.composite
def mutated_requests(draw):
    """Mostly-valid requests with a few fields replaced, dropped or added."""
    obj = valid_obj(request_id=draw(st.from_regex(r"[A-Za-z0-9-]{1,70}", fullmatch=True)))
    obj["input"] = draw(st.one_of(st.just(obj["input"]), input_maps))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(field_names)
        action = draw(st.sampled_from(["set", "drop"]))
        if action == "drop":
            obj.pop(name, None)
        else:
            obj[name] = draw(values)
    return obj


REQUEST_SCHEMA = json_schema("request")
_validator = jsonschema.Draft202012Validator(REQUEST_SCHEMA)


def _json_compatible(obj) -> bool:
    try:
        json.dumps(obj, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


@hsettings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_typed_errors(data):
    try:
        InferRequest.decode(data)
    except WireError as e:
        assert isinstance(e.code, ErrorCode) and e.message.strip()
        if e.message.startswith("not valid msgpack"):
            assert MSGPACK_REASON.match(e.message), e.message


@hsettings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_requests())
def test_fuzz_structured_decoder_agrees_with_json_schema(obj):
    """Any msgpack map: the decoder accepts exactly what the JSON Schema accepts (when the map is
    expressible in JSON), and rejections are typed."""
    data = pack(obj)
    try:
        req = InferRequest.decode(data)
        accepted = True
    except WireError as e:
        assert isinstance(e.code, ErrorCode)
        accepted = False
    if _json_compatible(obj):
        assert accepted == _validator.is_valid(obj), (obj, accepted)
    if accepted:
        assert InferRequest.decode(req.encode()) == req


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=200), st.integers(0, 200))
def test_fuzz_truncated_and_spliced_msgpack(noise, cut):
    good = InferRequest(tenant_id="acme", text="some text here").encode()
    for data in (good[:cut], good[:cut] + noise, noise + good):
        try:
            InferRequest.decode(data)
        except WireError as e:
            assert isinstance(e.code, ErrorCode)
