"""Turn a PackedBatch + resident tenants into the index tensors one forward pass needs.

Sequences are reordered so that every PET group (PET type + bank) owns one contiguous token
range and, inside it, tenants are contiguous segments sorted by slot. Every PET op then works on
a plain slice of the activations, and batched ops gather weights by slot: the number of kernel
launches depends on the number of groups (bounded by config diversity), never on tenant count.
All index arrays are built with numpy and shipped to the device in ONE host-to-device copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PET_ORDER = ("lora", "adapter", "bitfit", "ia3", "diff", "maskbert", "none")
POOL_CODES = {"cls": 0, "mean": 1, "pooler": 2}
TILE_M = 64  # token tile of the Triton segmented kernels


class IndexPacker:
    """Collect int64 arrays, ship them in one copy, hand back device views."""

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._shapes: list[tuple[int, ...]] = []

    def add(self, arr) -> int:
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.int64))
        self._parts.append(a.reshape(-1))
        self._shapes.append(a.shape)
        return len(self._parts) - 1

    def ship(self, device: torch.device, stream=None) -> list[torch.Tensor]:
        flat = np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64)
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
            with torch.cuda.stream(stream) if stream is not None else _null():
                dev = host.to(device, non_blocking=True)
        else:
            dev = host
        out, off = [], 0
        for part, shape in zip(self._parts, self._shapes):
            out.append(dev[off:off + part.size].view(shape))
            off += part.size
        self._host = host  # keep the pinned source alive until the copy is done
        return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@dataclass
class Segments:
    """A contiguous token range [t0, t1) of sequences sorted by slot."""

    t0: int
    t1: int
    max_len: int
    seq_slots: Any = None  # [n] slot per sequence
    tok_slots: Any = None  # [n_tok] slot per token
    pad_idx: Any = None  # [n, max_len] local token index per (sequence, position), clamped
    valid_flat: Any = None  # [n_tok] position of each token in the flattened [n * max_len]
    tiles: Any = None  # [3, n_tiles] (start, end, slot), local token offsets, for Triton
    n_tiles: int = 0


@dataclass
class PetGroup:
    pet_type: str
    bank: Any  # SlotBank or None (diff / maskbert / none)
    seg: Segments
    tenants: list = field(default_factory=list)  # [(resident, t0, t1)] absolute token ranges


@dataclass
class HeadGroup:
    bank: Any
    seq_rows: Any = None  # seq_cls: rows of the pooled matrix
    seq_slots: Any = None
    seq_nlabels: Any = None
    seq_order: list = field(default_factory=list)  # sorted-seq positions (host) of seq_rows
    tok_pad_idx: Any = None  # token_cls: [n, Lmax] absolute token index, clamped
    tok_valid_flat: Any = None
    tok_slots: Any = None
    tok_nlabels: Any = None
    tok_order: list = field(default_factory=list)
    tok_lens: list = field(default_factory=list)


@dataclass
class BatchPlan:
    num_seqs: int
    num_tokens: int
    max_len: int
    order: list[int]  # order[j] = original sequence index of sorted sequence j
    residents: list  # per sorted sequence
    input_ids: Any = None
    token_type_ids: Any = None
    positions: Any = None
    cu_seqlens: Any = None  # int32 on device
    lengths_host: list = field(default_factory=list)
    cu_host: list = field(default_factory=list)
    pad_idx: Any = None  # [B, max_len] for padded attention (CPU path)
    valid_flat: Any = None
    tok_seq: Any = None  # [T] sorted-sequence index of each token (mean pooling)
    cls_rows: Any = None
    mean_rows: Any = None
    pooler_rows: Any = None
    groups: list[PetGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)
    layer_events: list = field(default_factory=list)  # per layer (+1 for heads): upload events to wait on

    def wait_layer(self, i: int) -> None:
        if i < len(self.layer_events) and self.layer_events[i]:
            stream = torch.cuda.current_stream()
            for ev in self.layer_events[i]:
                stream.wait_event(ev)


def _pad_index(lens: list[int], max_len: int, base: int = 0):
    """[n, max_len] token index (clamped) and flat valid positions, for sequences laid back to back."""
    n = len(lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) + base
    pos = np.arange(max_len, dtype=np.int64)[None, :]
    lens_a = np.asarray(lens, dtype=np.int64)[:, None]
    idx = starts[:, None] + np.minimum(pos, lens_a - 1)
    valid = (np.arange(n, dtype=np.int64)[:, None] * max_len + pos)[pos < lens_a]
    return idx, valid


def _tiles(lens, slots):
    """Merge consecutive same-slot sequences into segments and cut them into TILE_M-token tiles
    (vectorised: no Python loop per sequence or tile)."""
    lens = np.asarray(lens, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    if lens.size == 0:
        return np.zeros((3, 0), dtype=np.int64)
    new_seg = np.ones(lens.size, dtype=bool)
    new_seg[1:] = slots[1:] != slots[:-1]
    first = np.nonzero(new_seg)[0]
    seg_len = np.add.reduceat(lens, first)
    seg_end = np.cumsum(seg_len)
    seg_start = seg_end - seg_len
    n_t = -(-seg_len // TILE_M)
    seg_of_tile = np.repeat(np.arange(first.size), n_t)
    within = np.arange(int(n_t.sum())) - np.repeat(np.cumsum(n_t) - n_t, n_t)
    starts = seg_start[seg_of_tile] + within * TILE_M
    ends = np.minimum(starts + TILE_M, seg_end[seg_of_tile])
    return np.stack([starts, ends, slots[first][seg_of_tile]]).astype(np.int64)


def build_plan(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor,
               residents: list, position_offset: int, device: torch.device, want_tiles: bool,
               stream=None) -> BatchPlan:
    """``residents[b]`` is the Resident of original sequence b (None: base-only, no head)."""
    cu = cu_seqlens.tolist()
    lens0 = [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]

    def sort_key(b):
        r = residents[b]
        if r is None:
            return (len(PET_ORDER), "", 0, b)
        return (PET_ORDER.index(r.pet_type), r.bank_key or "", r.sort_slot, b)

    order = sorted(range(len(lens0)), key=sort_key)
    lens = [lens0[b] for b in order]
    res_sorted = [residents[b] for b in order]
    new_cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    T, B, max_len = int(new_cu[-1]), len(lens), max(lens)

    ids_np = input_ids.numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    old_start = np.asarray(cu, dtype=np.int64)[:-1][order]
    tok_perm = np.repeat(old_start - new_cu[:-1], lens) + np.arange(int(new_cu[-1]), dtype=np.int64)
    pk = IndexPacker()
    h_ids = pk.add(ids_np.astype(np.int64)[tok_perm])
    h_tt = pk.add(token_type_ids.numpy().astype(np.int64)[tok_perm]) if token_type_ids is not None else None
    tok_seq = np.repeat(np.arange(B, dtype=np.int64), lens)
    positions = np.arange(T, dtype=np.int64) - new_cu[:-1][tok_seq] + position_offset
    h_pos = pk.add(positions)
    h_cu = pk.add(new_cu)
    pad_idx, valid = _pad_index(lens, max_len)
    h_pad, h_valid, h_tokseq = pk.add(pad_idx), pk.add(valid), pk.add(tok_seq)
    h_cls = pk.add(new_cu[:-1])

    plan = BatchPlan(num_seqs=B, num_tokens=T, max_len=max_len, order=order, residents=res_sorted,
                     lengths_host=lens, cu_host=new_cu.tolist())

    # PET groups: runs of sorted sequences with the same (pet_type, bank).
    group_handles = []
    j = 0
    while j < B:
        r = res_sorted[j]
        if r is None:
            j += 1
            continue
        k = j
        while k < B and res_sorted[k] is not None and res_sorted[k].pet_type == r.pet_type \
                and res_sorted[k].bank_key == r.bank_key:
            k += 1
        g_lens = lens[j:k]
        slots = [res_sorted[s].slot for s in range(j, k)]
        t0, t1 = int(new_cu[j]), int(new_cu[k])
        seg = Segments(t0=t0, t1=t1, max_len=max(g_lens))
        tenants = []
        if r.bank is None:  # per-tenant ops: contiguous range of each tenant
            s = j
            while s < k:
                e = s
                while e < k and res_sorted[e] is res_sorted[s]:
                    e += 1
                tenants.append((res_sorted[s], int(new_cu[s]), int(new_cu[e])))
                s = e
            hs = None
        else:
            gp, gv = _pad_index(g_lens, seg.max_len)
            hs = [pk.add(slots), pk.add(np.repeat(slots, g_lens)), pk.add(gp), pk.add(gv)]
            if want_tiles:
                tiles = _tiles(g_lens, slots)
                seg.n_tiles = tiles.shape[1]
                hs.append(pk.add(tiles))
        group_handles.append(hs)
        plan.groups.append(PetGroup(r.pet_type, r.bank, seg, tenants))
        j = k

    # Pooling rows and head groups (heads are independent of the PET grouping).
    pool_kind = np.array([POOL_CODES.get(getattr(r, "pooling", "cls"), 0) if r is not None else 0
                          for r in res_sorted])
    h_mean = pk.add(np.nonzero(pool_kind == 1)[0])
    h_pooler = pk.add(np.nonzero(pool_kind == 2)[0])
    heads: dict[str, dict] = {}
    for s, r in enumerate(res_sorted):
        if r is None or r.head_bank is None:
            continue
        d = heads.setdefault(r.head_bank.key, {"bank": r.head_bank, "seq": [], "tok": []})
        d["tok" if r.task == "token_cls" else "seq"].append(s)
    head_handles = []
    for d in heads.values():
        hg = HeadGroup(bank=d["bank"], seq_order=d["seq"], tok_order=d["tok"])
        hh = {}
        if d["seq"]:
            hh["seq"] = (pk.add(d["seq"]), pk.add([res_sorted[s].head_slot for s in d["seq"]]),
                         pk.add([res_sorted[s].n_labels for s in d["seq"]]))
        if d["tok"]:
            tl = [lens[s] for s in d["tok"]]
            hg.tok_lens = tl
            mx = max(tl)
            pos = np.arange(mx)[None, :]
            idx = new_cu[d["tok"]][:, None] + np.minimum(pos, np.asarray(tl)[:, None] - 1)
            vf = (np.arange(len(tl))[:, None] * mx + pos)[pos < np.asarray(tl)[:, None]]
            hh["tok"] = (pk.add(idx), pk.add(vf), pk.add([res_sorted[s].head_slot for s in d["tok"]]),
                         pk.add([res_sorted[s].n_labels for s in d["tok"]]))
        head_handles.append(hh)
        plan.heads.append(hg)

    dev = pk.ship(device, stream)
    plan.input_ids = dev[h_ids]
    plan.token_type_ids = dev[h_tt] if h_tt is not None else None
    plan.positions = dev[h_pos]
    plan.cu_seqlens = dev[h_cu].to(torch.int32)
    plan.pad_idx, plan.valid_flat, plan.tok_seq = dev[h_pad], dev[h_valid], dev[h_tokseq]
    plan.cls_rows, plan.mean_rows, plan.pooler_rows = dev[h_cls], dev[h_mean], dev[h_pooler]
    for g, hs in zip(plan.groups, group_handles):
        if hs is None:
            continue
        g.seg.seq_slots, g.seg.tok_slots, g.seg.pad_idx, g.seg.valid_flat = (dev[h] for h in hs[:4])
        if want_tiles:
            g.seg.tiles = dev[hs[4]]
    for hg, hh in zip(plan.heads, head_handles):
        if "seq" in hh:
            hg.seq_rows, hg.seq_slots, hg.seq_nlabels = (dev[h] for h in hh["seq"])
        if "tok" in hh:
            hg.tok_pad_idx, hg.tok_valid_flat, hg.tok_slots, hg.tok_nlabels = (dev[h] for h in hh["tok"])
    plan._packer = pk
    return plan
