"""Data types at the engine boundary: request items, packed batches, outputs, tenant deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.engine.errors import BatchError, EngineError


@dataclass
class TenantDelta:
    """What the store's ``load_delta(tenant_id)`` returns: one tenant's PET delta + task head.

    ``tensors`` uses the names of schema.layout (``layers.{i}.{site}.{param}``, ``head.*``).
    """

    tenant_id: str
    version: int | str
    pet_type: str
    config: dict
    tensors: dict[str, torch.Tensor]


@dataclass
class RequestItem:
    """One request before tokenisation: text, text pair, or ready token ids."""

    tenant_id: str
    text: str | None = None
    text_pair: str | None = None
    token_ids: list[int] | None = None
    token_type_ids: list[int] | None = None
    request_id: Any = None


@dataclass
class PackedBatch:
    """Unpadded token stream of B sequences: sequence b is input_ids[cu_seqlens[b]:cu_seqlens[b+1]]."""

    input_ids: torch.Tensor  # int [T]
    cu_seqlens: torch.Tensor  # int [B+1], cu_seqlens[0] == 0
    tenant_ids: list[str]
    token_type_ids: torch.Tensor | None = None  # int [T]
    request_ids: list[Any] | None = None
    enqueued_at: float | None = None  # time.perf_counter() when the worker formed the batch

    def __post_init__(self):
        # Whole-array checks (numpy views of the tensors; no per-sequence Python).
        self.input_ids = _as_tensor(self.input_ids)
        self.cu_seqlens = _as_tensor(self.cu_seqlens)
        cu = self.cu_seqlens.numpy()
        if cu.size != len(self.tenant_ids) + 1 or cu[0] != 0 or cu[-1] != self.input_ids.numel():
            raise BatchError("cu_seqlens must be [0, ..., T] with one entry per tenant_id plus one")
        if len(self.tenant_ids) == 0:
            raise BatchError("empty batch")
        if (cu[1:] <= cu[:-1]).any():
            raise BatchError("every sequence needs at least one token")
        if self.token_type_ids is not None:
            self.token_type_ids = _as_tensor(self.token_type_ids)
            if self.token_type_ids.numel() != self.input_ids.numel():
                raise BatchError("token_type_ids length differs from input_ids")
        if self.request_ids is not None and len(self.request_ids) != len(self.tenant_ids):
            raise BatchError("request_ids length differs from tenant_ids")

    @property
    def num_seqs(self) -> int:
        return len(self.tenant_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def lengths(self) -> list[int]:
        cu = self.cu_seqlens.numpy()
        return (cu[1:] - cu[:-1]).tolist()


def _as_tensor(x) -> torch.Tensor:
    """1-D CPU integer tensor (numpy arrays are wrapped without a copy)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.int64))
    if t.device.type != "cpu":
        t = t.cpu()
    return t.reshape(-1)


@dataclass
class RequestOutput:
    """One sequence's answer. ``error`` set means no prediction (only this request failed)."""

    tenant_id: str
    request_id: Any = None
    adapter_version: int | str | None = None
    task: str | None = None
    label: str | None = None  # seq_cls: argmax label
    scores: list[float] | None = None  # seq_cls: softmax over the tenant's labels
    labels: list[str] | None = None  # the tenant's label names, in the order of scores
    logits: list[float] | None = None
    token_labels: list[str] | None = None  # token_cls: argmax per token
    token_scores: list[list[float]] | None = None  # token_cls: softmax per token
    timings: dict[str, float] = field(default_factory=dict)
    error: EngineError | None = None


@dataclass(frozen=True)
class TenantInfo:
    """What every row of one tenant in a batch shares (labels: the resident's own list, not copied)."""

    version: int | str | None = None
    task: str | None = None
    labels: list[str] | None = None
    error: EngineError | None = None


class BatchOutputs:
    """One batch's answers as whole arrays, in batch order, plus per-tenant metadata.

    The engine fills it with a few numpy scatters per batch (no per-row Python); ``outputs[i]``
    is a lazy :class:`RowOutput` view with the fields of :class:`RequestOutput`, and
    ``outputs[i].reply_outputs()`` builds the reply's ``outputs`` map straight from the arrays.

    Arrays (row = sequence of the batch, in batch order):
      row_tenant  int32 [B]       index into ``tenants`` (one TenantInfo per distinct tenant)
      n_labels    int32 [B]       the row's label count (0 for failed rows)
      top_idx     int32 [B]       seq_cls: index of the top label (-1 otherwise)
      top_score   float32 [B]     seq_cls: its softmax score
      scores      float32 [B, C]  seq_cls: softmax over the tenant's labels, zero padded to C
      logits      float32 [B, C]  seq_cls: raw head logits, padded
      tok_start, tok_len  int64 [B]  token_cls: the row's token range in the tok_* arrays
      tok_top_idx int32 [Tt], tok_top_score float32 [Tt], tok_scores float32 [Tt, Ct]
    """

    def __init__(self, tenant_ids: list[str], request_ids: list | None, tenants: list[TenantInfo], row_tenant,
                 *, scores=None, logits=None, top_idx=None, top_score=None, n_labels=None, tok_start=None,
                 tok_len=None, tok_scores=None, tok_top_idx=None, tok_top_score=None,
                 timings: dict | None = None):
        B = len(tenant_ids)
        self.tenant_ids, self.request_ids, self.tenants = tenant_ids, request_ids, tenants
        self.row_tenant = np.asarray(row_tenant, dtype=np.int32)
        z32 = np.zeros(B, dtype=np.int32)
        self.n_labels = n_labels if n_labels is not None else z32
        self.top_idx = top_idx if top_idx is not None else np.full(B, -1, dtype=np.int32)
        self.top_score = top_score if top_score is not None else np.zeros(B, dtype=np.float32)
        self.scores = scores if scores is not None else np.zeros((B, 0), dtype=np.float32)
        self.logits = logits if logits is not None else np.zeros((B, 0), dtype=np.float32)
        self.tok_start = tok_start if tok_start is not None else np.zeros(B, dtype=np.int64)
        self.tok_len = tok_len if tok_len is not None else np.zeros(B, dtype=np.int64)
        self.tok_scores = tok_scores if tok_scores is not None else np.zeros((0, 0), dtype=np.float32)
        self.tok_top_idx = tok_top_idx if tok_top_idx is not None else np.zeros(0, dtype=np.int32)
        self.tok_top_score = tok_top_score if tok_top_score is not None else np.zeros(0, dtype=np.float32)
        self.timings = timings if timings is not None else {}

    @classmethod
    def failed(cls, tenant_ids: list[str], request_ids: list | None, error: EngineError,
               timings: dict | None = None) -> "BatchOutputs":
        """Every row carries the same error (the whole batch failed)."""
        return cls(list(tenant_ids), request_ids, [TenantInfo(error=error)], [0] * len(tenant_ids),
                   timings=timings)

    # ---- sequence protocol: outputs[i], len(), iteration -------------------------------------
    def __len__(self) -> int:
        return len(self.tenant_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [RowOutput(self, j) for j in range(*i.indices(len(self)))]
        n = len(self.tenant_ids)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return RowOutput(self, i)

    def __iter__(self):
        return (RowOutput(self, i) for i in range(len(self.tenant_ids)))

    def slice(self, start: int, stop: int) -> "BatchOutputs":
        """Rows [start, stop) as a BatchOutputs of array views (no copy, no per-row Python): e.g. the
        part of a merged batch that belongs to one edge process. Token arrays stay whole (tok_start
        indexes into them)."""
        rid = self.request_ids[start:stop] if self.request_ids is not None else None
        return BatchOutputs(self.tenant_ids[start:stop], rid, self.tenants, self.row_tenant[start:stop],
                            scores=self.scores[start:stop], logits=self.logits[start:stop],
                            top_idx=self.top_idx[start:stop], top_score=self.top_score[start:stop],
                            n_labels=self.n_labels[start:stop], tok_start=self.tok_start[start:stop],
                            tok_len=self.tok_len[start:stop], tok_scores=self.tok_scores,
                            tok_top_idx=self.tok_top_idx, tok_top_score=self.tok_top_score, timings=self.timings)

    def __getstate__(self):  # pickles as its arrays (the per-row list cache is rebuilt on demand)
        d = dict(self.__dict__)
        d.pop("_py", None)
        return d

    def _lists(self) -> tuple:
        """Per-batch Python lists of the row arrays (a few C-level .tolist() calls, once), so that
        per-row access is plain list indexing."""
        py = self.__dict__.get("_py")
        if py is None:
            py = self._py = (self.row_tenant.tolist(), self.top_idx.tolist(), self.n_labels.tolist(),
                             self.scores.tolist(), self.tok_start.tolist(), self.tok_len.tolist(),
                             self.tok_top_idx.tolist(), self.tok_top_score.tolist())
        return py

    def errors(self) -> list:
        """Per row: the row's EngineError or None (one list comprehension over ints)."""
        errs = [t.error for t in self.tenants]
        return [errs[k] for k in self.row_tenant.tolist()]

    def to_request_outputs(self) -> list["RequestOutput"]:
        return [r.to_request_output() for r in self]


class RowOutput:
    """Lazy view of one row of a :class:`BatchOutputs`: the fields of :class:`RequestOutput`, each
    computed on access from the batch arrays (lists are new objects on every access)."""

    __slots__ = ("_b", "_i")

    def __init__(self, batch: BatchOutputs, i: int):
        self._b, self._i = batch, i

    @property
    def _t(self) -> TenantInfo:
        return self._b.tenants[self._b._lists()[0][self._i]]

    @property
    def tenant_id(self) -> str:
        return self._b.tenant_ids[self._i]

    @property
    def request_id(self):
        r = self._b.request_ids
        return r[self._i] if r is not None else None

    @property
    def error(self) -> EngineError | None:
        return self._t.error

    @property
    def adapter_version(self):
        return self._t.version

    @property
    def task(self) -> str | None:
        return self._t.task

    @property
    def timings(self) -> dict:
        return self._b.timings

    def _seq(self) -> bool:
        t = self._t
        return t.error is None and t.task != "token_cls"

    def _tok(self) -> bool:
        t = self._t
        return t.error is None and t.task == "token_cls"

    @property
    def labels(self) -> list[str] | None:
        t = self._t
        return list(t.labels) if t.error is None and t.labels is not None else None

    @property
    def label(self) -> str | None:
        return self._t.labels[self._b._lists()[1][self._i]] if self._seq() else None

    @property
    def scores(self) -> list[float] | None:
        if not self._seq():
            return None
        py = self._b._lists()
        return py[3][self._i][:py[2][self._i]]

    @property
    def logits(self) -> list[float] | None:
        return self._b.logits[self._i, :self._b.n_labels[self._i]].tolist() if self._seq() else None

    def _tok_range(self) -> slice:
        s = int(self._b.tok_start[self._i])
        return slice(s, s + int(self._b.tok_len[self._i]))

    @property
    def token_labels(self) -> list[str] | None:
        if not self._tok():
            return None
        names = self._t.labels
        return [names[j] for j in self._b.tok_top_idx[self._tok_range()].tolist()]

    @property
    def token_scores(self) -> list[list[float]] | None:
        if not self._tok():
            return None
        return self._b.tok_scores[self._tok_range(), :self._b.n_labels[self._i]].tolist()

    def reply_outputs(self) -> dict[str, Any]:
        """The reply's ``outputs`` map (ok rows): seq_cls {label, scores, labels}; token_cls
        {token_labels, token_scores (top score per token)}. Plain list indexing on per-batch lists."""
        b, i = self._b, self._i
        rt, ti, nl, sc, ts, tl, tti, tts = b._lists()
        t = b.tenants[rt[i]]
        if t.task == "token_cls":
            s = ts[i]
            e = s + tl[i]
            names = t.labels
            return {"token_labels": [names[j] for j in tti[s:e]], "token_scores": tts[s:e]}
        return {"label": t.labels[ti[i]], "scores": sc[i][:nl[i]], "labels": list(t.labels)}

    def to_request_output(self) -> RequestOutput:
        return RequestOutput(tenant_id=self.tenant_id, request_id=self.request_id,
                             adapter_version=self.adapter_version, task=self.task, label=self.label,
                             scores=self.scores, labels=self.labels, logits=self.logits,
                             token_labels=self.token_labels, token_scores=self.token_scores,
                             timings=dict(self.timings), error=self.error)

    def __repr__(self) -> str:
        return f"RowOutput({self.to_request_output()!r})"
