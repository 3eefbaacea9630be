"""What crosses the boundary between edge processes and the engine process of one worker.

- Control frames: length-prefixed pickles over a Unix socket pair, one per batch (plus leases,
  hand-over calls, status and metrics), never one per request.
- Token batches: each edge has a shared-memory segment of ``slots`` fixed slots; a slot holds a
  packed batch (int32 token ids, token type ids, cu_seqlens, per-sequence tenant index). The
  edge owns a slot from packing until the batch's result frame comes back.
- Results: per batch, arrays (scores flattened with offsets, top label index) plus one entry per
  distinct tenant (label names, adapter version); errors by sequence index. Token
  classification outputs, rare and large, travel as objects.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

_LEN = struct.Struct("!I")


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame, or None at end of stream (the other process is gone)."""
    try:
        head = await reader.readexactly(4)
        return pickle.loads(await reader.readexactly(_LEN.unpack(head)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def write_frame(writer: asyncio.StreamWriter, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)


@dataclass
class SlotLayout:
    slots: int
    max_tokens: int
    max_seqs: int

    @property
    def slot_bytes(self) -> int:
        return 4 * (2 * self.max_tokens + 2 * self.max_seqs + 1)

    @property
    def total_bytes(self) -> int:
        return self.slots * self.slot_bytes


class SlotRing:
    """A shared-memory segment cut into fixed batch slots (numpy views, no copies to write)."""

    def __init__(self, layout: SlotLayout, name: str | None = None, create: bool = False):
        self.layout = layout
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=layout.total_bytes if create else 0)
        self.name = self.shm.name
        if not create:
            # Python < 3.13 registers an attached segment with this process's resource tracker,
            # which would unlink it when this process exits; the creator owns its lifetime.
            from multiprocessing import resource_tracker
            try:
                resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
            except Exception:  # noqa: BLE001
                pass
        self._views = []
        T, S = layout.max_tokens, layout.max_seqs
        for i in range(layout.slots):
            base = np.ndarray((layout.slot_bytes // 4,), dtype=np.int32, buffer=self.shm.buf,
                              offset=i * layout.slot_bytes)
            self._views.append((base[:T], base[T:2 * T], base[2 * T:2 * T + S + 1], base[2 * T + S + 1:2 * T + 2 * S + 1]))

    def views(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids[T], token_type_ids[T], cu_seqlens[S+1], tenant_index[S]) of a slot."""
        return self._views[slot]

    def read(self, slot: int, n_seqs: int, n_tokens: int, has_tt: bool):
        """Copies of a slot's arrays (the engine keeps them while the edge reuses the slot)."""
        ids, tt, cu, ten = self._views[slot]
        return (ids[:n_tokens].copy(), tt[:n_tokens].copy() if has_tt else None, cu[:n_seqs + 1].copy(),
                ten[:n_seqs].copy())

    def close(self, unlink: bool = False) -> None:
        self._views = []
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still referenced somewhere; the mapping goes with the process
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


@dataclass
class ArrayBatch:
    """A packed batch on the edge side: numpy arrays and the distinct tenants (no torch)."""

    input_ids: np.ndarray  # int32 [T]
    token_type_ids: np.ndarray | None  # int32 [T]
    cu_seqlens: np.ndarray  # int32 [B+1]
    tenant_index: np.ndarray  # int32 [B] into tenants
    tenants: list[str]

    @property
    def num_seqs(self) -> int:
        return len(self.tenant_index)


def pack_works(works: list[Any]) -> ArrayBatch:
    """Works (with token ids) -> ArrayBatch, one pass, no per-token Python objects kept."""
    lens = np.fromiter((len(w.token_ids) for w in works), dtype=np.int32, count=len(works))
    cu = np.zeros(len(works) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    ids = np.fromiter((t for w in works for t in w.token_ids), dtype=np.int32, count=int(cu[-1]))
    tt = None
    if any(w.token_type_ids for w in works):
        tt = np.fromiter((t for w in works for t in (w.token_type_ids or [0] * len(w.token_ids))), dtype=np.int32,
                         count=int(cu[-1]))
    index: dict[str, int] = {}
    ten = np.fromiter((index.setdefault(w.request.tenant_id, len(index)) for w in works), dtype=np.int32,
                      count=len(works))
    return ArrayBatch(ids, tt, cu, ten, list(index))


# ---------------------------------------------------------------- results
_ERRORS = ("UnknownTenant", "AdapterLoadError", "PoolExhausted", "BatchError", "EngineError")


def encode_outputs(outputs: list[Any]) -> dict:
    """RequestOutputs of one edge's batch -> arrays + per-tenant facts."""
    n = len(outputs)
    nscores = np.zeros(n, dtype=np.int32)
    label_idx = np.full(n, -1, dtype=np.int32)
    flat: list[float] = []
    tenants: dict[str, tuple] = {}
    errors: dict[int, tuple[str, str]] = {}
    objects: dict[int, Any] = {}
    for i, o in enumerate(outputs):
        if o.error is not None:
            name = type(o.error).__name__
            errors[i] = (name if name in _ERRORS else "EngineError", str(o.error))
            continue
        if o.token_labels is not None or o.scores is None or o.labels is None or o.label not in o.labels:
            objects[i] = o
            continue
        if o.tenant_id not in tenants:
            tenants[o.tenant_id] = (o.labels, o.adapter_version, o.task)
        nscores[i] = len(o.scores)
        flat.extend(o.scores)
        label_idx[i] = o.labels.index(o.label)
    return {"n": n, "nscores": nscores, "scores": np.asarray(flat, dtype=np.float64), "label_idx": label_idx,
            "tenants": tenants, "errors": errors, "objects": objects}


def decode_outputs(res: dict, tenant_of: list[str]) -> list[Any]:
    """The edge side: per sequence an object reply_for_output understands."""
    from workers.engine import errors as engine_errors
    from workers.engine.batch import RequestOutput
    out: list[Any] = []
    cu = np.zeros(res["n"] + 1, dtype=np.int64)
    np.cumsum(res["nscores"], out=cu[1:])
    scores = res["scores"].tolist()
    label_idx = res["label_idx"].tolist()
    tenants, errors, objects = res["tenants"], res["errors"], res["objects"]
    for i in range(res["n"]):
        tenant = tenant_of[i]
        if i in errors:
            cls, msg = errors[i]
            out.append(RequestOutput(tenant_id=tenant, error=getattr(engine_errors, cls)(msg)))
        elif i in objects:
            out.append(objects[i])
        else:
            labels, version, task = tenants[tenant]
            li = label_idx[i]
            out.append(RequestOutput(tenant_id=tenant, adapter_version=version, task=task,
                                     label=labels[li],
                                     scores=scores[cu[i]:cu[i + 1]], labels=labels))
    return out
