"""Turning engine answers and intake failures into wire replies and DLQ records."""

from __future__ import annotations

from typing import Any

from schema.messages import ErrorCode, Headers, InferReply
from workers.engine.errors import AdapterLoadError, BatchError, EngineError, PoolExhausted, UnknownTenant

_CODE_OF_ERROR: list[tuple[type[Exception], ErrorCode]] = [
    (UnknownTenant, ErrorCode.UNKNOWN_TENANT),
    (AdapterLoadError, ErrorCode.ADAPTER_UNAVAILABLE),
    (PoolExhausted, ErrorCode.OVERLOADED),
    (BatchError, ErrorCode.INVALID_INPUT),
]


def code_of(exc: BaseException) -> ErrorCode:
    for cls, code in _CODE_OF_ERROR:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def outputs_of(out: Any) -> dict[str, Any]:
    """The ``outputs`` map of an ok reply from an engine row (BatchOutputs row view or RequestOutput)."""
    fast = getattr(out, "reply_outputs", None)
    if fast is not None:  # engine RowOutput: built straight from the batch's arrays
        return fast()
    o: dict[str, Any] = {}
    if out.token_labels is not None:
        o["token_labels"] = list(out.token_labels)
        o["token_scores"] = [max(p) for p in out.token_scores] if out.token_scores else []
    else:
        o["label"] = out.label
        o["scores"] = [float(x) for x in out.scores]
        labels = getattr(out, "labels", None)
        if labels is not None:
            o["labels"] = list(labels)
    return o


def reply_for_output(out: Any, *, request_id: str, tenant_id: str, worker_id: str,
                     timings: dict[str, float]) -> InferReply:
    if out.error is not None:
        r = InferReply.error(code_of(out.error), str(out.error) or type(out.error).__name__,
                             request_id=request_id, tenant_id=tenant_id, worker_id=worker_id)
        return InferReply(**{**r.__dict__, "timings": timings})
    version = out.adapter_version if isinstance(out.adapter_version, int) else None
    return InferReply(request_id=request_id, tenant_id=tenant_id, status=ErrorCode.OK, outputs=outputs_of(out),
                      adapter_version=version, worker_id=worker_id, timings=timings)


def dlq_headers(original: list[tuple[str, bytes]] | None, reason: str, source: str,
                value: bytes | None = None) -> list[tuple[str, bytes]]:
    """Original headers kept, plus why and where from. With ``value``, the reason also names the
    record's size and first bytes (unless it already does) so it can be read without a hex dump."""
    if value is not None and "first bytes:" not in reason:
        reason += f"; {len(value)} bytes, first bytes: {value[:16].hex(' ') + (' …' if len(value) > 16 else '') or '(empty)'}"
    keep = [(k, v) for k, v in (original or []) if k not in (Headers.ERROR, Headers.SOURCE)]
    return keep + [(Headers.ERROR, reason[:1000].encode("utf-8", "replace")), (Headers.SOURCE, source.encode())]


__all__ = ["code_of", "outputs_of", "reply_for_output", "dlq_headers", "EngineError"]
