"""Fuzzed poison records, each labelled with what it is owed: a typed reply (when its request id
and tenant can be read) and/or a DLQ record (when it is malformed). The labels come from how
each record was built, not from the decoder under test."""

from __future__ import annotations

import random
import uuid

import msgpack

from schema.messages import MAX_TEXT_CHARS, InferRequest

KINDS = ("random_bytes", "truncated", "wrong_types", "bad_tenant_type", "huge_string", "unknown_tenant",
         "wrong_version")


def poison(i: int, rng: random.Random, tenants: list[str]) -> tuple[bytes, str | None, str, bool]:
    """(value, request_id owed a reply or None, key, owed a DLQ record)."""
    kind = KINDS[i % len(KINDS)]
    rid = str(uuid.UUID(int=rng.getrandbits(128)))
    base = InferRequest(tenant_id=rng.choice(tenants), text="poison neighbour", request_id=rid).to_wire()
    if kind == "random_bytes":
        # 0xc1 is never valid msgpack: the record cannot decode whatever follows.
        return b"\xc1" + rng.randbytes(rng.randint(0, 300)), None, "poison", True
    if kind == "truncated":
        data = msgpack.packb(base)
        return data[: rng.randint(1, len(data) - 1)], None, "poison", True
    if kind == "wrong_types":
        field_ = rng.choice(["created_at_ms", "deadline_ms", "input", "reply_to"])
        # (a string would be a valid reply_to topic name, so it only corrupts the other fields)
        base[field_] = rng.choice([["x"], {"a": 1}, 3.5, True] + (["str"] if field_ != "reply_to" else []))
        if field_ == "input":
            base["input"] = {"text": 12345}
        return msgpack.packb(base), rid, base["tenant_id"], True
    if kind == "bad_tenant_type":
        base["tenant_id"] = rng.randint(0, 10**6)
        return msgpack.packb(base), None, "poison", True
    if kind == "huge_string":
        base["input"] = {"text": "x" * (MAX_TEXT_CHARS + rng.randint(1, 200_000))}
        return msgpack.packb(base), rid, base["tenant_id"], False
    if kind == "unknown_tenant":
        base["tenant_id"] = f"ghost-{rng.randint(0, 10**9)}"
        return msgpack.packb(base), rid, base["tenant_id"], False
    base["schema_version"] = rng.choice([0, 2, 99])
    return msgpack.packb(base), rid, base["tenant_id"], False
