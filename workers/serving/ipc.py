"""What crosses the boundary between edge processes and the engine process of one worker.

- Control frames: length-prefixed pickles over a Unix socket pair, one per batch (plus leases,
  hand-over calls, status and metrics), never one per request.
- Token batches: each edge has a shared-memory segment of ``slots`` fixed slots; a slot holds a
  packed batch (int32 token ids, token type ids, cu_seqlens, per-sequence tenant index). The
  edge owns a slot from packing until the batch's result frame comes back.
- Results: per batch, the rows of the engine's BatchOutputs that belong to the edge (top label
  index and score, padded scores/logits, token ranges) plus its per-tenant facts, once.
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


_CREATED: set[str] = set()  # segments this process created (and whose lifetime it owns)


class SlotRing:
    """A shared-memory segment cut into fixed batch slots (numpy views, no copies to write)."""

    def __init__(self, layout: SlotLayout, name: str | None = None, create: bool = False):
        self.layout = layout
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=layout.total_bytes if create else 0)
        self.name = self.shm.name
        if create:
            _CREATED.add(self.name)
        elif self.name not in _CREATED:
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
_ROW_ARRAYS = ("row_tenant", "n_labels", "top_idx", "top_score", "scores", "logits", "tok_start", "tok_len")
_TOK_ARRAYS = ("tok_scores", "tok_top_idx", "tok_top_score")


def encode_outputs(outputs: Any, start: int, stop: int) -> dict:
    """Rows [start, stop) of the engine's BatchOutputs as arrays: one edge's share of a merged
    batch. Per-tenant facts (labels, version, task, error) go once per batch, not per row."""
    res = {k: getattr(outputs, k)[start:stop] for k in _ROW_ARRAYS}
    if len(outputs.tok_top_idx) and res["tok_len"].any():
        res.update({k: getattr(outputs, k) for k in _TOK_ARRAYS})
    res["tenants"] = outputs.tenants
    res["timings"] = outputs.timings
    return res


def decode_outputs(res: dict, tenant_of: list[str]) -> Any:
    """The edge side: a BatchOutputs again (rows are lazy views reply_for_output understands)."""
    from workers.engine.batch import BatchOutputs
    tok = {k: res[k] for k in _TOK_ARRAYS if k in res}
    return BatchOutputs(tenant_of, None, res["tenants"], res["row_tenant"], timings=res["timings"],
                        **{k: res[k] for k in _ROW_ARRAYS if k != "row_tenant"}, **tok)
