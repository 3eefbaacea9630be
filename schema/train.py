"""Wire contract of training jobs: TrainJob / TrainReply v1 as msgpack maps on ``flock.train``.

A job names the tenant (the record key), the PET type and its config, training options, and its
data: ``rows`` inline (small sets; the whole message stays under ``MAX_JOB_BYTES``) or a ``uri``
the trainer reads itself -- a local path (``file:///...`` or ``/...``) or a PostgreSQL large
object (``pg-lo://<oid>``). There are no network fetches, so no other scheme is accepted.

Structure is checked here (types, limits, which keys); what the rows *mean* (columns for the task,
labels) is checked by the trainer's data loader, and a job it rejects fails with that reason.
The closed parts are Field tables validated by ``schema.messages.check_map``; ``config``, rows and
reply metrics are open maps of plain values, checked by ``_plain``. ``json_schema(kind)`` gives the
published JSON Schema (``schema/train_job.v1.json``, ``schema/train_reply.v1.json``).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from schema.layout import TASKS
from schema.messages import (ID_RE, SCHEMA_VERSION, TENANT_RE, TOPIC_RE, ErrorCode, Field, WireError, check_map,
                             has_value, now_ms, object_schema)
from schema.pet import PET_TYPES

CONTENT_TYPE = "application/vnd.flock.train.v1+msgpack"
MAX_JOB_BYTES = 1 << 20  # whole encoded job, inline rows included (Kafka's default record limit)
MAX_INLINE_ROWS = 20_000
MAX_URI_LEN = 4096
MAX_CONFIG_BYTES = 16 << 10  # config / metrics maps, as msgpack
MAX_REASON_CHARS = 4096
URI_RE = r"^((file://)?/[^\x00]*|pg-lo://[1-9][0-9]{0,9})$"
_INT32 = dict(minimum=0, maximum=2**31 - 1)


class JobStatus(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class FailureCode(str, enum.Enum):
    """Why a job failed; upstream pipelines switch on these strings."""

    INVALID_JOB = "invalid_job"  # the message is not a valid v1 job
    INVALID_DATA = "invalid_data"  # rows/file rejected: wrong columns, unknown labels, empty, oversize
    UNKNOWN_TENANT = "unknown_tenant"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # the trainer died on it FLOCK_TRAIN_MAX_ATTEMPTS times
    INTERNAL = "internal"


OPTION_FIELDS = (
    Field("task", "enum", required=False, enum=TASKS, doc="default: from the data's columns"),
    Field("epochs", "int", required=False, minimum=1, maximum=1000),
    Field("learning_rate", "float", required=False),
    Field("batch_size", "int", required=False, minimum=1, maximum=4096),
    Field("max_length", "int", required=False, minimum=8, maximum=8192),
    Field("seed", "int", required=False, **_INT32),
    Field("val_split", "float", required=False, doc="fraction held out for validation, 0..0.5"),
    Field("patience", "int", required=False, minimum=0, maximum=1000, doc="early stopping, epochs; 0 = off"),
    Field("labels", "list[str]", required=False, max_len=1024, doc="allowed labels; others fail the job"),
    Field("activate", "enum", required=False, enum=("yes", "no"), doc="activate the new version (default yes)"),
)
DATA_FIELDS = (
    Field("rows", "list[map]", required=False, max_len=MAX_INLINE_ROWS,
          doc="inline examples: {text[, text_pair], label} or {tokens, tags}"),
    Field("uri", "str", required=False, max_len=MAX_URI_LEN, pattern=URI_RE,
          doc="file:///abs/path, /abs/path (JSONL or CSV) or pg-lo://<oid>"),
    Field("format", "enum", required=False, enum=("jsonl", "csv"), doc="default: from the path's suffix"),
)
DATA_ONE_OF = (("rows",), ("uri",), ("uri", "format"))
JOB_FIELDS = (
    Field("schema_version", "int", minimum=SCHEMA_VERSION, maximum=SCHEMA_VERSION),
    Field("job_id", "str", pattern=ID_RE, max_len=64, doc="idempotency key; the training_jobs row"),
    Field("tenant_id", "str", pattern=TENANT_RE, max_len=63),
    Field("pet_type", "enum", enum=PET_TYPES),
    Field("config", "dict", required=False, doc="PET config (r, sites, bottleneck, layers, density, ...)"),
    Field("options", "map", required=False, fields=OPTION_FIELDS),
    Field("data", "map", fields=DATA_FIELDS, one_of=DATA_ONE_OF),
    Field("validation", "map", required=False, nullable=True, fields=DATA_FIELDS, one_of=DATA_ONE_OF,
          doc="separate validation set (else options.val_split)"),
    Field("reply_to", "str", required=False, nullable=True, pattern=TOPIC_RE, max_len=249,
          doc="outcome topic; default flock.train.replies"),
    Field("created_at_ms", "int", minimum=0, maximum=2**63 - 1),
)
REPLY_FIELDS = (
    Field("schema_version", "int", minimum=SCHEMA_VERSION, maximum=SCHEMA_VERSION),
    Field("job_id", "str", max_len=64),
    Field("tenant_id", "str", max_len=63),
    Field("status", "enum", enum=tuple(s.value for s in JobStatus)),
    Field("code", "enum", required=False, nullable=True, enum=tuple(c.value for c in FailureCode)),
    Field("reason", "str", required=False, nullable=True, max_len=MAX_REASON_CHARS),
    Field("adapter_version", "int", required=False, nullable=True, **_INT32),
    Field("metrics", "dict", required=False, nullable=True, doc="accuracy, macro_f1, per-label counts, ..."),
    Field("attempts", "int", **_INT32),
    Field("trainer_id", "str", required=False, nullable=True, max_len=128),
    Field("created_at_ms", "int", minimum=0, maximum=2**63 - 1),
)


# ------------------------------------------------------------------ the kinds check_map lacks
def _plain(v: Any, name: str, depth: int = 0) -> None:
    """Open maps hold plain values only: str, int, finite float, bool, nil, lists and maps."""
    if depth > 6:
        raise WireError(ErrorCode.MALFORMED, f"{name!r} nested too deeply")
    if v is None or isinstance(v, (str, bool, int)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise WireError(ErrorCode.MALFORMED, f"{name!r} holds a non-finite number")
        return
    if isinstance(v, list):
        for x in v:
            _plain(x, name, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise WireError(ErrorCode.MALFORMED, f"{name!r} has a non-string key")
            _plain(x, f"{name}.{k}", depth + 1)
        return
    raise WireError(ErrorCode.MALFORMED, f"{name!r} holds a {type(v).__name__}")


_OPEN = ("dict", "list[map]", "map")


def _open_parts(spec: tuple[Field, ...], obj: Any, where: str, one_of=None) -> dict:
    """Validate a map whose table has kinds check_map lacks ("dict", "list[map]"): the scalar
    fields go through check_map, maps recurse, the open kinds are checked here."""
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.MALFORMED, f"{where.rstrip('.') or 'message'} must be a map")
    known = {f.name for f in spec}
    for k in obj:
        if not isinstance(k, str):
            raise WireError(ErrorCode.MALFORMED, f"{where.rstrip('.') or 'message'} has a non-string key")
        if k not in known:
            raise WireError(ErrorCode.MALFORMED, f"unknown field {where}{k!r}")
    scalars = tuple(f for f in spec if f.kind not in _OPEN)
    part = {f.name: obj[f.name] for f in scalars if f.name in obj}
    obj.update(check_map(scalars, part, where))
    for f in spec:
        if f.kind not in _OPEN:
            continue
        name = f"{where}{f.name}"
        if not has_value(f, obj, name):
            continue
        v = obj[f.name]
        if f.kind == "map":
            _open_parts(f.fields or (), v, f"{name}.", f.one_of)
        elif f.kind == "dict":
            if not isinstance(v, dict):
                raise WireError(ErrorCode.MALFORMED, f"{name!r} must be a map")
            _plain(v, name)
            if len(msgpack.packb(v, use_bin_type=True)) > MAX_CONFIG_BYTES:
                raise WireError(ErrorCode.INPUT_TOO_LARGE, f"{name!r} larger than {MAX_CONFIG_BYTES} bytes")
        else:
            if not isinstance(v, list):
                raise WireError(ErrorCode.MALFORMED, f"{name!r} must be an array")
            if f.max_len is not None and len(v) > f.max_len:
                raise WireError(ErrorCode.INPUT_TOO_LARGE, f"{name!r} has more than {f.max_len} items")
            for i, row in enumerate(v):
                if not isinstance(row, dict):
                    raise WireError(ErrorCode.MALFORMED, f"{name}[{i}] must be a map")
                _plain(row, f"{name}[{i}]")
    if one_of is not None:
        present = tuple(sorted(obj))
        if present not in {tuple(sorted(keys)) for keys in one_of}:
            allowed = " | ".join("+".join(keys) for keys in one_of)
            raise WireError(ErrorCode.MALFORMED, f"{where.rstrip('.') or 'message'} must hold exactly {allowed}")
    return obj


def _check_job(obj: Any) -> dict:
    for part in ("data", "validation"):
        uri = obj.get(part, {}).get("uri") if isinstance(obj, dict) and isinstance(obj.get(part), dict) else None
        if isinstance(uri, str) and not re.fullmatch(URI_RE, uri):
            raise WireError(ErrorCode.MALFORMED, f"'{part}.uri' {uri[:100]!r} is not a local path (file:///..., "
                            "/...) or pg-lo://<oid>; the trainer fetches nothing over the network")
    return _open_parts(JOB_FIELDS, obj, "")


def _unpack(data: Any, limit: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(ErrorCode.MALFORMED, "message value must be bytes")
    if len(data) > limit:
        raise WireError(ErrorCode.INPUT_TOO_LARGE, f"job of {len(data)} bytes exceeds {limit}; "
                        "send large data sets by uri (file path or pg-lo://<oid>)")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True, max_str_len=limit,
                               max_bin_len=0, max_array_len=MAX_INLINE_ROWS, max_map_len=256, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for bad bytes; all mean the same here
        raise WireError(ErrorCode.MALFORMED, f"not valid msgpack: {type(exc).__name__}: {str(exc)[:200]}") from None


def _salvage(obj: Any) -> dict[str, str | None]:
    """The job id, tenant and reply address of a job that failed validation, where valid."""
    out: dict[str, str | None] = {"request_id": None, "tenant_id": None, "reply_to": None}
    if isinstance(obj, dict):
        for key, wire, pat in (("request_id", "job_id", ID_RE), ("tenant_id", "tenant_id", TENANT_RE),
                               ("reply_to", "reply_to", TOPIC_RE)):
            v = obj.get(wire)
            if isinstance(v, str) and re.fullmatch(pat, v):
                out[key] = v
    return out


# ------------------------------------------------------------------ messages
@dataclass(frozen=True)
class TrainJob:
    """A decoded, valid job. ``data`` / ``validation``: {"rows": [...]} or {"uri": ..., ["format"]}.
    A WireError from ``decode`` carries the salvaged job id in ``request_id``."""

    job_id: str
    tenant_id: str
    pet_type: str
    data: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    reply_to: str | None = None
    created_at_ms: int = field(default_factory=now_ms)
    schema_version: int = SCHEMA_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "job_id": self.job_id, "tenant_id": self.tenant_id,
                "pet_type": self.pet_type, "config": dict(self.config), "options": dict(self.options),
                "data": dict(self.data), "validation": self.validation, "reply_to": self.reply_to,
                "created_at_ms": self.created_at_ms}

    def encode(self) -> bytes:
        obj = self.to_wire()
        data = msgpack.packb(obj, use_bin_type=True)
        _check_job(msgpack.unpackb(data, raw=False))  # never put an invalid job on the wire
        if len(data) > MAX_JOB_BYTES:
            raise WireError(ErrorCode.INPUT_TOO_LARGE, f"job of {len(data)} bytes exceeds {MAX_JOB_BYTES}; "
                            "send large data sets by uri (file path or pg-lo://<oid>)")
        return data

    def headers(self) -> list[tuple[str, bytes]]:
        return [("flock-job-id", self.job_id.encode()), ("flock-tenant-id", self.tenant_id.encode()),
                ("content-type", CONTENT_TYPE.encode()), ("flock-schema-version", str(self.schema_version).encode())]

    def data_source(self, which: str = "data") -> str:
        """What the training_jobs row shows for the data: ``inline:<n> rows`` or the uri."""
        d = self.data if which == "data" else (self.validation or {})
        return f"inline:{len(d['rows'])} rows" if "rows" in d else str(d.get("uri", ""))

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = MAX_JOB_BYTES) -> "TrainJob":
        try:
            obj = _unpack(data, max_bytes)
        except WireError as e:
            if e.code is not ErrorCode.INPUT_TOO_LARGE or len(data) > 16 * max_bytes:
                raise
            try:  # oversize, but the job can still be named in its failed row and reply
                salvage = _salvage(_unpack(data, 16 * max_bytes))
            except WireError:
                raise e from None
            raise WireError(e.code, e.message, **salvage) from None
        salvage = _salvage(obj)
        version = obj.get("schema_version") if isinstance(obj, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
            raise WireError(ErrorCode.UNSUPPORTED_VERSION,
                            f"schema_version {version} not supported (this trainer speaks {SCHEMA_VERSION})", **salvage)
        try:
            _check_job(obj)
        except WireError as e:
            raise WireError(e.code, e.message, **salvage) from None
        return cls(job_id=obj["job_id"], tenant_id=obj["tenant_id"], pet_type=obj["pet_type"], data=obj["data"],
                   config=obj.get("config") or {}, options=obj.get("options") or {},
                   validation=obj.get("validation"), reply_to=obj.get("reply_to"),
                   created_at_ms=obj["created_at_ms"], schema_version=obj["schema_version"])


@dataclass(frozen=True)
class TrainReply:
    job_id: str
    tenant_id: str
    status: JobStatus
    attempts: int
    code: FailureCode | None = None
    reason: str | None = None
    adapter_version: int | None = None
    metrics: dict[str, Any] | None = None
    trainer_id: str | None = None
    created_at_ms: int = field(default_factory=now_ms)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.SUCCEEDED

    def to_wire(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "job_id": self.job_id, "tenant_id": self.tenant_id,
                "status": self.status.value, "code": self.code.value if self.code else None,
                "reason": None if self.reason is None else self.reason[:MAX_REASON_CHARS],
                "adapter_version": self.adapter_version, "metrics": self.metrics, "attempts": self.attempts,
                "trainer_id": self.trainer_id, "created_at_ms": self.created_at_ms}

    def encode(self) -> bytes:
        obj = self.to_wire()
        _open_parts(REPLY_FIELDS, dict(obj), "")  # never put an invalid reply on the wire
        return msgpack.packb(obj, use_bin_type=True)

    def headers(self) -> list[tuple[str, bytes]]:
        return [("flock-job-id", self.job_id.encode()), ("flock-tenant-id", self.tenant_id.encode()),
                ("content-type", CONTENT_TYPE.encode()), ("flock-schema-version", str(self.schema_version).encode())]

    @classmethod
    def decode(cls, data: bytes) -> "TrainReply":
        obj = _open_parts(REPLY_FIELDS, _unpack(data, 4 * MAX_JOB_BYTES), "")
        return cls(job_id=obj["job_id"], tenant_id=obj["tenant_id"], status=JobStatus(obj["status"]),
                   attempts=obj["attempts"], code=FailureCode(obj["code"]) if obj.get("code") else None,
                   reason=obj.get("reason"), adapter_version=obj.get("adapter_version"),
                   metrics=obj.get("metrics"), trainer_id=obj.get("trainer_id"),
                   created_at_ms=obj["created_at_ms"], schema_version=obj["schema_version"])


# ------------------------------------------------------------------ JSON Schema
_ROW_SCHEMA = {"type": "object", "additionalProperties": {
    "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "array", "items": {"type": "string"}}]}}


def _schema(spec: tuple[Field, ...], one_of=None) -> dict[str, Any]:
    s = object_schema(tuple(f for f in spec if f.kind not in _OPEN))
    props = dict(s["properties"])
    for f in spec:  # keep the table's order
        if f.kind == "dict":
            p: dict[str, Any] = {"type": "object", "description": f.doc}
        elif f.kind == "list[map]":
            p = {"type": "array", "items": _ROW_SCHEMA, "maxItems": f.max_len, "description": f.doc}
        elif f.kind == "map":
            p = _schema(f.fields or (), f.one_of)
            if f.doc:
                p["description"] = f.doc
        else:
            continue
        props[f.name] = {"anyOf": [p, {"type": "null"}]} if f.nullable else p
    s["properties"] = {f.name: props[f.name] for f in spec}
    s["required"] = [f.name for f in spec if f.required]
    if one_of:
        s["oneOf"] = [{"required": list(keys), "properties": {f.name: False for f in spec if f.name not in keys}}
                      for keys in one_of]
    return s


def json_schema(kind: str) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the msgpack map for ``job`` or ``reply``."""
    spec, title = {"job": (JOB_FIELDS, "TrainJob"), "reply": (REPLY_FIELDS, "TrainReply")}[kind]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://flockserve.dev/schema/train_{kind}.v{SCHEMA_VERSION}.json",
            "title": f"Flock {title} v{SCHEMA_VERSION} (msgpack map on flock.train)",
            **_schema(spec)}
