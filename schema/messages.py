"""Wire contract: InferRequest / InferReply v1 as msgpack maps, Kafka headers, typed errors.

The field tables below are the single definition: the strict decoders (the exact one, and the
msgspec Structs of the fast path) and the JSON Schema files under ``schema/`` (for producers in
other languages) are all generated from them, and a test keeps the committed JSON files equal to
what this module generates.

Data plane entry points per batch: ``decode_requests(values)`` and ``encode_replies(replies)``.
"""

from __future__ import annotations

import enum
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from operator import is_not
from typing import Annotated, Any, Callable, Literal, MutableSequence, Optional, Sequence, Union

import msgpack
import msgspec

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/vnd.flock.v1+msgpack"

MAX_MESSAGE_BYTES = 1 << 20  # whole encoded request
MAX_TEXT_CHARS = 100_000  # per text field, before tokenisation
MAX_TOKEN_IDS = 8192
MAX_ID_LEN = 64
TOPIC_RE = r"^[A-Za-z0-9._-]{1,249}$"
ID_RE = r"^[A-Za-z0-9._:-]{1,64}$"
TENANT_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ErrorCode(str, enum.Enum):
    """Status of a reply. Producers switch on these strings."""

    OK = "ok"
    MALFORMED = "malformed"  # bytes are not a valid v1 request (goes to the DLQ if no reply address)
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TENANT = "unknown_tenant"
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # tenant known but no usable adapter
    INPUT_TOO_LARGE = "input_too_large"
    INVALID_INPUT = "invalid_input"  # e.g. token id outside the vocabulary
    EXPIRED = "expired"  # deadline passed before compute
    OVERLOADED = "overloaded"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"  # missing/invalid tenant signature (docs/security.md)


class Headers:
    """Kafka header names carried on requests and replies (values are UTF-8 bytes)."""

    REQUEST_ID = "flock-request-id"
    TENANT_ID = "flock-tenant-id"
    CONTENT_TYPE = "content-type"
    SCHEMA_VERSION = "flock-schema-version"
    REPLY_TO = "flock-reply-to"
    ERROR = "flock-error"  # DLQ records: why the record was rejected
    SOURCE = "flock-source"  # DLQ records: topic/partition/offset of the original
    AUTH = "flock-auth"  # requests: "v1:<key_id>:<base64url HMAC-SHA256 of the value>" (workers/auth.py)


class WireError(ValueError):
    """Bytes that are not a valid message. ``code`` says which kind of error it is."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: str | None = None,
                 tenant_id: str | None = None, reply_to: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        # What could be salvaged so that the sender still gets a typed error reply.
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.reply_to = reply_to


# ------------------------------------------------------------------ field tables
@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "str", "int", "float", "map", "list[int]", "list[float]", "list[str]", "enum"
    required: bool = True
    pattern: str | None = None
    max_len: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] | None = None
    nullable: bool = False
    fields: tuple["Field", ...] | None = None  # for kind "map": its fields (closed)
    one_of: tuple[tuple[str, ...], ...] | None = None  # for "map": allowed key sets
    doc: str = ""


_INT64 = dict(minimum=0, maximum=2**63 - 1)

INPUT_FIELDS = (
    Field("text", "str", required=False, max_len=MAX_TEXT_CHARS, doc="raw text"),
    Field("text_pair", "str", required=False, max_len=MAX_TEXT_CHARS, doc="second segment"),
    Field("token_ids", "list[int]", required=False, max_len=MAX_TOKEN_IDS, minimum=0,
          maximum=2**31 - 1, doc="pre-tokenised ids incl. special tokens"),
)

REQUEST_FIELDS = (
    Field("schema_version", "int", minimum=SCHEMA_VERSION, maximum=SCHEMA_VERSION),
    Field("request_id", "str", pattern=ID_RE, max_len=MAX_ID_LEN, doc="UUID or ULID; idempotency key"),
    Field("tenant_id", "str", pattern=TENANT_RE, max_len=63),
    Field("input", "map", fields=INPUT_FIELDS,
          one_of=(("text",), ("text", "text_pair"), ("token_ids",))),
    Field("created_at_ms", "int", doc="producer clock, unix ms", **_INT64),
    Field("deadline_ms", "int", required=False, nullable=True, doc="unix ms; expired after", **_INT64),
    Field("reply_to", "str", required=False, nullable=True, pattern=TOPIC_RE, max_len=249,
          doc="reply topic; default flock.replies"),
)

ERROR_FIELDS = (
    Field("code", "enum", enum=tuple(c.value for c in ErrorCode if c is not ErrorCode.OK)),
    Field("message", "str", max_len=4096),
)
OUTPUT_FIELDS = (
    Field("label", "str", required=False, max_len=256),
    Field("scores", "list[float]", required=False, max_len=1024, doc="softmax over the tenant's labels"),
    Field("labels", "list[str]", required=False, max_len=1024, doc="label names, same order as scores"),
    Field("token_labels", "list[str]", required=False, max_len=MAX_TOKEN_IDS),
    Field("token_scores", "list[float]", required=False, max_len=MAX_TOKEN_IDS,
          doc="probability of each token's label"),
)
TIMING_FIELDS = (
    Field("queue_ms", "float", required=False),
    Field("compute_ms", "float", required=False),
    Field("total_ms", "float", required=False),
)
REPLY_FIELDS = (
    Field("schema_version", "int", minimum=SCHEMA_VERSION, maximum=SCHEMA_VERSION),
    Field("request_id", "str", max_len=MAX_ID_LEN),
    Field("tenant_id", "str", max_len=63),
    Field("status", "enum", enum=tuple(c.value for c in ErrorCode)),
    Field("error", "map", required=False, nullable=True, fields=ERROR_FIELDS),
    Field("outputs", "map", required=False, nullable=True, fields=OUTPUT_FIELDS),
    Field("adapter_version", "int", required=False, nullable=True, **_INT64),
    Field("worker_id", "str", required=False, nullable=True, max_len=128),
    Field("timings", "map", required=False, nullable=True, fields=TIMING_FIELDS),
    Field("created_at_ms", "int", **_INT64),
)


# ------------------------------------------------------------------ validation
def has_value(f: Field, obj: dict, name: str) -> bool:
    """Whether ``obj`` holds a value for field ``f`` to check; a missing required field or a null
    non-nullable one is a MALFORMED error (``name`` is its path in the message)."""
    if f.name not in obj:
        if f.required:
            raise WireError(ErrorCode.MALFORMED, f"missing field {name!r}")
        return False
    if obj[f.name] is None:
        if f.nullable:
            return False
        raise WireError(ErrorCode.MALFORMED, f"{name!r} must not be null")
    return True


def _check(spec: tuple[Field, ...], obj: Any, where: str, one_of=None) -> dict:
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.MALFORMED, f"{where or 'message'} must be a map")
    known = {f.name for f in spec}
    for k in obj:
        if not isinstance(k, str):
            raise WireError(ErrorCode.MALFORMED, f"{where or 'message'} has a non-string key")
        if k not in known:
            raise WireError(ErrorCode.MALFORMED, f"unknown field {where}{k!r}")
    for f in spec:
        name = f"{where}{f.name}"
        if has_value(f, obj, name):
            obj[f.name] = _check_value(f, obj[f.name], name)
    if one_of is not None:
        present = tuple(sorted(obj))
        if present not in {tuple(sorted(s)) for s in one_of}:
            allowed = " | ".join("+".join(s) for s in one_of)
            raise WireError(ErrorCode.MALFORMED, f"{where or 'message'} must hold exactly {allowed}")
    return obj


def check_map(spec: tuple[Field, ...], obj: Any, where: str = "", one_of=None) -> dict:
    """Validate (and normalise) a map against a field table; raises WireError. Public so that
    other contracts built from Field tables (schema/train.py) validate exactly like this one."""
    return _check(spec, obj, where, one_of)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> Any:
    """Integral floats count as integers (JSON Schema's rule; JavaScript encoders emit them)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def _check_value(f: Field, v: Any, name: str) -> Any:
    """Raise WireError unless ``v`` fits ``f``; return it normalised (integral floats -> int)."""
    bad = lambda what: WireError(ErrorCode.MALFORMED, f"{name!r} {what}")  # noqa: E731
    if f.kind == "str" or f.kind == "enum":
        if not isinstance(v, str):
            raise bad("must be a string")
        if f.max_len is not None and len(v) > f.max_len:
            code = ErrorCode.INPUT_TOO_LARGE if f.name in ("text", "text_pair") else ErrorCode.MALFORMED
            raise WireError(code, f"{name!r} longer than {f.max_len} characters")
        if f.pattern and not re.fullmatch(f.pattern, v):
            raise bad(f"does not match {f.pattern}")
        if f.enum and v not in f.enum:
            raise bad(f"must be one of {list(f.enum)}")
    elif f.kind == "int":
        v = _as_int(v)
        if not _is_int(v):
            raise bad("must be an integer")
        if (f.minimum is not None and v < f.minimum) or (f.maximum is not None and v > f.maximum):
            raise bad(f"out of range [{f.minimum}, {f.maximum}]")
    elif f.kind == "float":
        if not (isinstance(v, float) or _is_int(v)) or not math.isfinite(v):
            raise bad("must be a finite number")
    elif f.kind.startswith("list["):
        if not isinstance(v, list):
            raise bad("must be an array")
        if f.max_len is not None and len(v) > f.max_len:
            code = ErrorCode.INPUT_TOO_LARGE if f.name == "token_ids" else ErrorCode.MALFORMED
            raise WireError(code, f"{name!r} has more than {f.max_len} items")
        item = f.kind[5:-1]
        if item == "int":
            v = [_as_int(x) for x in v]
        for x in v:
            if item == "int" and not (_is_int(x) and (f.minimum is None or x >= f.minimum)
                                      and (f.maximum is None or x <= f.maximum)):
                raise bad(f"items must be integers in [{f.minimum}, {f.maximum}]")
            if item == "float" and not ((isinstance(x, float) or _is_int(x)) and math.isfinite(x)):
                raise bad("items must be finite numbers")
            if item == "str" and not isinstance(x, str):
                raise bad("items must be strings")
    elif f.kind == "map":
        _check(f.fields or (), v, f"{name}.", f.one_of)
    else:  # pragma: no cover - a programming error in the tables
        raise AssertionError(f.kind)
    return v


def _unpack(data: bytes, limit: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(ErrorCode.MALFORMED, "message has no value (null)" if data is None
                        else f"message value must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise WireError(ErrorCode.INPUT_TOO_LARGE, f"message of {len(data)} bytes exceeds {limit}")
    try:
        # Limits bound memory even before validation; raw=False rejects invalid UTF-8.
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                               max_str_len=limit, max_bin_len=0,
                               max_array_len=MAX_TOKEN_IDS * 2, max_map_len=64, max_ext_len=0)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises many types for bad bytes; all mean the same here
        raise WireError(ErrorCode.MALFORMED, _msgpack_failure(bytes(data), exc, limit)) from None


def _msgpack_failure(data: bytes, exc: Exception, limit: int) -> str:
    """Why ``data`` is not msgpack, where (byte offset) and what it starts with. Error path only:
    msgpack's own text can be empty (FormatError), which left DLQ reasons saying nothing."""
    what = str(exc).strip()
    if isinstance(exc, msgpack.ExtraData):
        at, what = len(data) - len(exc.extra), "trailing bytes after a complete value"
    else:
        # Replaying with a streaming Unpacker (same limits) tells where the parse stopped.
        u = msgpack.Unpacker(raw=False, strict_map_key=True, use_list=True, max_buffer_size=max(len(data), 1),
                             max_str_len=limit, max_bin_len=0, max_array_len=MAX_TOKEN_IDS * 2,
                             max_map_len=64, max_ext_len=0)
        u.feed(data)
        try:
            u.unpack()
        except Exception:  # noqa: BLE001 - only the position is wanted here
            pass
        at = u.tell()
        if isinstance(exc, msgpack.StackError):
            what = "values nested too deeply"
        elif isinstance(exc, msgpack.FormatError) or not what:
            what = (f"byte 0x{data[at]:02x} is not a valid msgpack type" if at < len(data)
                    else "input ends inside a value")
        elif what.endswith("incomplete input"):
            at, what = len(data), "input ends inside a value (truncated?)"
    head = data[:16].hex(" ") + (" …" if len(data) > 16 else "")
    return (f"not valid msgpack at byte {at} of {len(data)}: {type(exc).__name__}: {what[:200]}; "
            f"first bytes: {head or '(empty)'}")


def _salvage(obj: Any) -> dict[str, str | None]:
    """Best-effort reply address from a request that failed validation."""
    out: dict[str, str | None] = {"request_id": None, "tenant_id": None, "reply_to": None}
    if isinstance(obj, dict):
        for key, pat in (("request_id", ID_RE), ("tenant_id", TENANT_RE), ("reply_to", TOPIC_RE)):
            v = obj.get(key)
            if isinstance(v, str) and re.fullmatch(pat, v):
                out[key] = v
    return out


# ------------------------------------------------------------------ fast path (msgspec)
# msgspec decodes msgpack straight into typed Structs and checks types, lengths, ranges and
# patterns in C: ~1 µs for a short request where msgpack -> dict -> _check took ~10 µs. The
# Structs are generated here from the same field tables (nothing is listed twice). The fast path
# only ever *accepts*: whenever it declines (any msgspec error, a post-check, an input it does not
# handle such as integral floats or a map16 header), the exact decoder above runs and gives the
# verdict, the typed error and its informative message. So it accepts a subset of what _check
# accepts, returns the same values, and never produces an error message of its own.
_FLOAT_MAX = 1.7976931348623157e308  # finite <=> -max <= x <= max (NaN fails both)


def _search_pattern(p: str) -> str:
    """msgspec matches with re.search, where '$' also matches before a final newline; the tables'
    anchored ^...$ patterns mean fullmatch, so '$' becomes '\\Z'."""
    assert p.startswith("^") and p.endswith("$") and not p.endswith("\\$"), p
    return p[:-1] + r"\Z"


def _meta(**kw: Any) -> Any:
    kw = {k: v for k, v in kw.items() if v is not None}
    return msgspec.Meta(**kw) if kw else None


def _annotated(t: Any, meta: Any) -> Any:
    return t if meta is None else Annotated[t, meta]


def _ms_scalar(kind: str, f: Field) -> Any:
    if kind == "str":
        return _annotated(str, _meta(max_length=f.max_len, pattern=f.pattern and _search_pattern(f.pattern)))
    if kind == "enum":
        return Literal.__getitem__(tuple(f.enum or ()))
    if kind == "int":
        return _annotated(int, _meta(ge=f.minimum, le=f.maximum))
    if kind == "float":
        return Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
    raise AssertionError(kind)  # pragma: no cover - a programming error in the tables


def _ms_type(f: Field, maps_as_raw: bool) -> Any:
    if f.kind == "map":
        return msgspec.Raw if maps_as_raw else _ms_struct(f.name, f.fields or (), False)
    if f.kind.startswith("list["):
        item = f.kind[5:-1]
        it = {"int": lambda: _annotated(int, _meta(ge=f.minimum, le=f.maximum)),
              "float": lambda: _ms_scalar("float", f),
              "str": lambda: str}[item]()  # list items carry no other limits in the tables
        return _annotated(list[it], _meta(max_length=f.max_len))
    return _ms_scalar(f.kind, f)


def _ms_struct(name: str, spec: tuple[Field, ...], maps_as_raw: bool) -> Any:
    """A Struct type for a closed map: required fields without default, optional nullable ones
    default None, optional non-nullable ones default UNSET (so an explicit nil is rejected)."""
    fields: list[tuple] = []
    for f in spec:
        t = _ms_type(f, maps_as_raw)
        if f.nullable:
            t = Optional[t]
        if f.required:
            fields.append((f.name, t))
        elif f.nullable:
            fields.append((f.name, t, None))
        else:
            fields.append((f.name, Union[t, msgspec.UnsetType], msgspec.UNSET))
    return msgspec.defstruct(name, fields, kw_only=True, forbid_unknown_fields=True, gc=False)


# The exact decoder rejects maps of more than 64 entries (msgpack max_map_len); msgspec would
# take duplicate keys (last wins, as a dict does). A fixmap (header 0x80-0x8f) holds at most 15
# entries, so the fast path takes only fixmaps, the request's and its input's (which therefore
# arrives as Raw), and leaves other headers to the exact decoder.
_REQUEST_DECODER = msgspec.msgpack.Decoder(_ms_struct("InferRequestV1", REQUEST_FIELDS, maps_as_raw=True))
_INPUT_FIELD = next(f for f in REQUEST_FIELDS if f.name == "input")
_INPUT_DECODER = msgspec.msgpack.Decoder(_ms_struct("InferRequestV1Input", _INPUT_FIELD.fields or (), False))
# one_of as "which of (text, text_pair, token_ids) are set" patterns
_INPUT_NAMES = tuple(f.name for f in _INPUT_FIELD.fields or ())
assert _INPUT_NAMES == ("text", "text_pair", "token_ids") and not any(f.nullable for f in _INPUT_FIELD.fields or ())
_INPUT_ONE_OF = frozenset(tuple(n in keys for n in _INPUT_NAMES) for keys in _INPUT_FIELD.one_of or ())
_UNSET = msgspec.UNSET
_Invalid = (msgspec.DecodeError, msgspec.ValidationError)
_new = object.__new__
_setattr = object.__setattr__
_REPLY_CHECK = msgspec.msgpack.Decoder(_ms_struct("InferReplyV1", REPLY_FIELDS, maps_as_raw=False))
_ENCODER = msgspec.msgpack.Encoder()
_HEADER_TAIL = [(Headers.CONTENT_TYPE, CONTENT_TYPE.encode()),
                (Headers.SCHEMA_VERSION, str(SCHEMA_VERSION).encode())]


# ------------------------------------------------------------------ messages
def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class InferRequest:
    tenant_id: str
    text: str | None = None
    text_pair: str | None = None
    token_ids: list[int] | None = None
    request_id: str = field(default_factory=new_request_id)
    deadline_ms: int | None = None
    reply_to: str | None = None
    created_at_ms: int = field(default_factory=now_ms)
    schema_version: int = SCHEMA_VERSION

    def to_wire(self) -> dict[str, Any]:
        inp: dict[str, Any] = {}
        if self.token_ids is not None:
            inp["token_ids"] = list(self.token_ids)
        else:
            inp["text"] = self.text
            if self.text_pair is not None:
                inp["text_pair"] = self.text_pair
        return {"schema_version": self.schema_version, "request_id": self.request_id,
                "tenant_id": self.tenant_id, "input": inp, "created_at_ms": self.created_at_ms,
                "deadline_ms": self.deadline_ms, "reply_to": self.reply_to}

    def encode(self) -> bytes:
        obj = self.to_wire()
        _check(REQUEST_FIELDS, obj, "")  # never put an invalid request on the wire
        return msgpack.packb(obj, use_bin_type=True)

    def headers(self) -> list[tuple[str, bytes]]:
        h = [(Headers.REQUEST_ID, self.request_id), (Headers.TENANT_ID, self.tenant_id),
             (Headers.CONTENT_TYPE, CONTENT_TYPE), (Headers.SCHEMA_VERSION, str(self.schema_version))]
        if self.reply_to:
            h.append((Headers.REPLY_TO, self.reply_to))
        return [(k, v.encode()) for k, v in h]

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> "InferRequest":
        """Strict decode; raises WireError (typed, with the salvaged reply address). For a batch
        of Kafka record values, ``decode_requests`` returns results and errors in one list."""
        if type(data) is bytes and 0 < len(data) <= max_bytes and 0x80 <= data[0] <= 0x8F:
            try:
                s = _REQUEST_DECODER.decode(data)
                raw = memoryview(s.input)
                i = _INPUT_DECODER.decode(raw) if 0x80 <= raw[0] <= 0x8F else None
            except _Invalid:
                i = None
            if i is not None:
                text, pair, ids = i.text, i.text_pair, i.token_ids
                if (text is not _UNSET, pair is not _UNSET, ids is not _UNSET) in _INPUT_ONE_OF:
                    # Accepted by the fast path, so the exact decoder would accept it too. Built
                    # without the frozen dataclass's __init__ (3x cheaper; same fields, eq, hash).
                    r = _new(cls)
                    _setattr(r, "__dict__", {
                        "tenant_id": s.tenant_id, "text": None if text is _UNSET else text,
                        "text_pair": None if pair is _UNSET else pair, "token_ids": None if ids is _UNSET else ids,
                        "request_id": s.request_id, "deadline_ms": s.deadline_ms, "reply_to": s.reply_to,
                        "created_at_ms": s.created_at_ms, "schema_version": s.schema_version})
                    return r
        return cls._decode_exact(data, max_bytes)

    @classmethod
    def _decode_exact(cls, data: bytes, max_bytes: int) -> "InferRequest":
        """msgpack -> dict -> _check: the reference decoder, and the one that words every error."""
        obj = _unpack(data, max_bytes)
        salvage = _salvage(obj)
        version = _as_int(obj.get("schema_version")) if isinstance(obj, dict) else None
        if _is_int(version) and version != SCHEMA_VERSION:
            raise WireError(ErrorCode.UNSUPPORTED_VERSION,
                            f"schema_version {version} not supported (this worker speaks {SCHEMA_VERSION})",
                            **salvage)
        try:
            _check(REQUEST_FIELDS, obj, "")
        except WireError as e:
            raise WireError(e.code, e.message, **salvage) from None
        inp = obj["input"]
        return cls(tenant_id=obj["tenant_id"], text=inp.get("text"), text_pair=inp.get("text_pair"),
                   token_ids=inp.get("token_ids"), request_id=obj["request_id"],
                   deadline_ms=obj.get("deadline_ms"), reply_to=obj.get("reply_to"),
                   created_at_ms=obj["created_at_ms"], schema_version=obj["schema_version"])


@dataclass(frozen=True)
class InferReply:
    request_id: str
    tenant_id: str
    status: ErrorCode
    error_message: str | None = None
    outputs: dict[str, Any] | None = None
    adapter_version: int | None = None
    worker_id: str | None = None
    timings: dict[str, float] | None = None
    created_at_ms: int = field(default_factory=now_ms)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status is ErrorCode.OK

    @classmethod
    def error(cls, code: ErrorCode, message: str, *, request_id: str, tenant_id: str,
              worker_id: str | None = None) -> "InferReply":
        return cls(request_id=request_id, tenant_id=tenant_id, status=code,
                   error_message=message[:4096], worker_id=worker_id)

    def to_wire(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "request_id": self.request_id,
                "tenant_id": self.tenant_id, "status": self.status.value,
                "error": None if self.ok else {"code": self.status.value, "message": self.error_message or ""},
                "outputs": self.outputs, "adapter_version": self.adapter_version,
                "worker_id": self.worker_id, "timings": self.timings,
                "created_at_ms": self.created_at_ms}

    def encode(self) -> bytes:
        """msgpack v1 bytes, checked against the reply table: the bytes are decoded once more by
        the generated Struct (~0.6 µs), so what goes out is a valid v1 reply whatever Python types
        built it. Anything the fast check declines is encoded by the exact path, which raises the
        informative WireError. Same bytes as msgpack.packb(to_wire(), use_bin_type=True).
        For a batch, ``encode_replies`` does values and headers in one call."""
        try:
            data = _ENCODER.encode(self.to_wire())
            _REPLY_CHECK.decode(data)
            return data
        except Exception:  # noqa: BLE001 - declined: the exact path decides and words the error
            return self._encode_exact()

    def _encode_exact(self) -> bytes:
        obj = self.to_wire()
        _check(REPLY_FIELDS, obj, "")
        return msgpack.packb(obj, use_bin_type=True)

    def headers(self) -> list[tuple[str, bytes]]:
        if self.schema_version != SCHEMA_VERSION:
            return [(Headers.REQUEST_ID, self.request_id.encode()), (Headers.TENANT_ID, self.tenant_id.encode()),
                    (Headers.CONTENT_TYPE, CONTENT_TYPE.encode()),
                    (Headers.SCHEMA_VERSION, str(self.schema_version).encode())]
        return [(Headers.REQUEST_ID, self.request_id.encode()), (Headers.TENANT_ID, self.tenant_id.encode()),
                *_HEADER_TAIL]

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = 4 * MAX_MESSAGE_BYTES) -> "InferReply":
        obj = _check(REPLY_FIELDS, _unpack(data, max_bytes), "")
        err = obj.get("error") or {}
        return cls(request_id=obj["request_id"], tenant_id=obj["tenant_id"],
                   status=ErrorCode(obj["status"]), error_message=err.get("message"),
                   outputs=obj.get("outputs"), adapter_version=obj.get("adapter_version"),
                   worker_id=obj.get("worker_id"), timings=obj.get("timings"),
                   created_at_ms=obj["created_at_ms"], schema_version=obj["schema_version"])


def header_map(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka headers as a dict of strings; undecodable values are dropped, never raised."""
    out: dict[str, str] = {}
    for k, v in headers or ():
        try:
            out[k] = v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)
        except UnicodeDecodeError:
            continue
    return out


# ------------------------------------------------------------------ batch entry points
def decode_requests(values: Sequence[bytes | None], *,
                    max_bytes: int = MAX_MESSAGE_BYTES) -> list[InferRequest | WireError]:
    """Decode a batch of Kafka record values: one entry per value, in order, either the
    InferRequest or the WireError it raised (typed code, informative message, salvaged
    request_id/tenant_id/reply_to for the error reply). Never raises for bad input. This is what
    the data plane calls per fetched batch instead of InferRequest.decode per record."""
    out: list[InferRequest | WireError] = []
    append = out.append
    decode = InferRequest.decode
    for v in values:
        try:
            append(decode(v, max_bytes=max_bytes))
        except WireError as e:
            append(e)
    return out


def encode_replies(replies: MutableSequence[InferReply]) -> tuple[list[bytes], list[list[tuple[str, bytes]]]]:
    """(values, headers) for a batch of replies, in order: the bytes of ``reply.encode()`` and the
    list of ``reply.headers()``. A reply that fails validation (e.g. a NaN score from a tenant
    whose weights overflow) does not fail the batch: its request is answered with an ``internal``
    error reply saying why, which also takes its place in ``replies``.
    This is what the data plane calls per engine batch instead of encode()/headers() per reply."""
    values: list[bytes] = []
    headers: list[list[tuple[str, bytes]]] = []
    enc, check = _ENCODER.encode, _REPLY_CHECK.decode
    for i, r in enumerate(replies):
        try:
            data = enc(r.to_wire())
            check(data)
        except Exception:  # noqa: BLE001 - declined by the fast check: exact path
            try:
                data = r._encode_exact()
            except WireError as e:
                r = replies[i] = InferReply.error(ErrorCode.INTERNAL, f"reply failed validation: {e.message}",
                                                  request_id=r.request_id, tenant_id=r.tenant_id,
                                                  worker_id=r.worker_id)
                data = r._encode_exact()
        values.append(data)
        headers.append(r.headers())
    return values, headers


# ------------------------------------------------------------------ JSON Schema
_JSON_TYPES: dict[str, Callable[[Field], dict]] = {
    "str": lambda f: {"type": "string"},
    "enum": lambda f: {"type": "string"},
    "int": lambda f: {"type": "integer"},
    "float": lambda f: {"type": "number"},
}


def _field_schema(f: Field) -> dict[str, Any]:
    if f.kind == "map":
        s = _object_schema(f.fields or (), f.one_of)
    elif f.kind.startswith("list["):
        item = f.kind[5:-1]
        items = {"int": {"type": "integer"}, "float": {"type": "number"}, "str": {"type": "string"}}[item]
        if item == "int":
            items = {**items, "minimum": f.minimum, "maximum": f.maximum}
        s = {"type": "array", "items": items}
        if f.max_len is not None:
            s["maxItems"] = f.max_len
    else:
        s = _JSON_TYPES[f.kind](f)
        if f.kind == "str" and f.max_len is not None:
            s["maxLength"] = f.max_len
        if f.pattern:
            s["pattern"] = f.pattern
        if f.enum:
            s["enum"] = list(f.enum)
        if f.kind == "int":
            if f.minimum is not None:
                s["minimum"] = f.minimum
            if f.maximum is not None:
                s["maximum"] = f.maximum
    if f.doc:
        s["description"] = f.doc
    if f.nullable:
        s = {"anyOf": [s, {"type": "null"}]}
    return s


def _object_schema(spec: tuple[Field, ...], one_of=None) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "additionalProperties": False,
                         "properties": {f.name: _field_schema(f) for f in spec},
                         "required": [f.name for f in spec if f.required]}
    if one_of:
        s["oneOf"] = [{"required": list(keys),
                       "properties": {f.name: False for f in spec if f.name not in keys}} for keys in one_of]
    return s


def object_schema(spec: tuple[Field, ...], one_of=None) -> dict[str, Any]:
    """JSON Schema of a closed map described by a field table (for other contracts' schemas)."""
    return _object_schema(spec, one_of)


def json_schema(kind: str) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the msgpack map for ``request`` or ``reply``."""
    spec, title = {"request": (REQUEST_FIELDS, "InferRequest"), "reply": (REPLY_FIELDS, "InferReply")}[kind]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://flockserve.dev/schema/{kind}.v{SCHEMA_VERSION}.json",
            "title": f"Flock {title} v{SCHEMA_VERSION} (msgpack map)",
            **_object_schema(spec)}
