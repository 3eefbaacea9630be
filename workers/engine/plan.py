"""Turn a PackedBatch + resident tenants into the index tensors one forward pass needs.

Sequences are reordered so that every PET group (PET type + bank) owns one contiguous token
range and, inside it, tenants are contiguous segments sorted by slot. Every PET op then works on
a plain slice of the activations, and batched ops gather weights by slot: the number of kernel
launches depends on the number of groups (bounded by config diversity), never on tenant count.
All index arrays are built with numpy and shipped to the device in ONE host-to-device copy.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.engine.pets.registry import PETS

PET_CODES = {name: k for k, name in enumerate(PETS)}  # group order = registry order; base-only last
NONE_CODE = len(PET_CODES)
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
        n = sum(p.size for p in self._parts)
        if device.type == "cuda":
            # Concatenate straight into a pinned buffer (torch's caching host allocator recycles it
            # only after the copy that used it completed), then one async H2D copy.
            host = torch.empty(n, dtype=torch.int64, pin_memory=True)
            if n:
                np.concatenate(self._parts, out=host.numpy())
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                dev = host.to(device, non_blocking=True)
        else:
            host = torch.from_numpy(np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64))
            dev = host
        out, off = [], 0
        for part, shape in zip(self._parts, self._shapes):
            out.append(dev[off:off + part.size].view(shape))
            off += part.size
        self._host = host  # keep the pinned source alive until the copy is done
        return out


@dataclass
class Segments:
    """A contiguous token range [t0, t1) of sequences sorted by slot."""

    t0: int
    t1: int
    max_len: int
    seq_slots: Any = None  # [n] slot per sequence
    tiles: Any = None  # [3, n_tiles] (start, end, slot), local token offsets, for Triton
    n_tiles: int = 0
    # Built on the device on first use (the Triton path never needs them), see properties below.
    _tok_slots: Any = None  # [n_tok] slot per token
    _pad_idx: Any = None  # [n, max_len] local token index per (sequence, position), clamped
    _valid_flat: Any = None  # [n_tok] position of each token in the flattened [n * max_len]
    _src: Any = None  # (cu64, tok_seq, positions, position offset, j, k): the plan's device index
    # tensors and the group's sorted-sequence range [j, k), to derive the above (no reference to
    # the plan itself: no cycle keeping device / pinned buffers alive until a GC pass)

    @property
    def tok_slots(self):
        if self._tok_slots is None and self._src is not None:
            _, tok_seq, _, _, j, _ = self._src
            self._tok_slots = self.seq_slots.index_select(0, tok_seq[self.t0:self.t1] - j)
        return self._tok_slots

    @tok_slots.setter
    def tok_slots(self, v):
        self._tok_slots = v

    @property
    def pad_idx(self):
        if self._pad_idx is None and self._src is not None:
            cu64, _, _, _, j, k = self._src
            self._pad_idx = _pad_dev(cu64[j:k + 1], self.max_len, self.t0)
        return self._pad_idx

    @pad_idx.setter
    def pad_idx(self, v):
        self._pad_idx = v

    @property
    def valid_flat(self):
        if self._valid_flat is None and self._src is not None:
            _, tok_seq, pos, off, j, _ = self._src
            t0, t1 = self.t0, self.t1
            self._valid_flat = (tok_seq[t0:t1] - j) * self.max_len + (pos[t0:t1] - off if off else pos[t0:t1])
        return self._valid_flat

    @valid_flat.setter
    def valid_flat(self, v):
        self._valid_flat = v


def _pad_dev(cu: torch.Tensor, max_len: int, base: int = 0) -> torch.Tensor:
    """[n, max_len] clamped token index from n+1 cumulative offsets (device ops, no host sync)."""
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=cu.device, dtype=cu.dtype)
    return (cu[:-1] - base).unsqueeze(1) + torch.minimum(pos.unsqueeze(0), (lens - 1).unsqueeze(1))


@dataclass
class PetGroup:
    pet_type: str
    bank: Any  # SlotBank or None (diff / maskbert / none)
    seg: Segments
    tenants: list = field(default_factory=list)  # [(resident, t0, t1)] absolute token ranges
    # built on first use by the group's PET module: bank-less groups' tiles + tenant pointer table
    # (pets/sparse.py); LoRA's tiles over the whole batch for the GEMM with the delta in its epilogue
    kernel_map: Any = None


@dataclass
class HeadGroup:
    bank: Any
    seq_rows: Any = None  # seq_cls: rows of the pooled matrix
    seq_slots: Any = None
    seq_nlabels: Any = None
    seq_order: list = field(default_factory=list)  # sorted-seq positions (host) of seq_rows
    dense_slots: Any = None  # two-layer heads: [u] distinct head slots of the group's seq rows,
    dense_idx: Any = None  # [u, m] group row of each (tenant, k) cell (clamped),
    dense_back: Any = None  # [n] flat cell of each group row (heads._dense)
    tok_pad_idx: Any = None  # token_cls: [n, Lmax] absolute token index, clamped
    tok_valid_flat: Any = None
    tok_slots: Any = None
    tok_nlabels: Any = None
    tok_order: list = field(default_factory=list)
    tok_lens: list = field(default_factory=list)
    seq_pos: Any = None  # np.int64: seq_order as an array
    tok_pos: Any = None  # np.int64: tok_order as an array
    tok_lens_np: Any = None


@dataclass
class BatchPlan:
    num_seqs: int
    num_tokens: int
    max_len: int
    order: Any  # np.int64 [B]: order[j] = original batch index of sorted sequence j
    input_ids: Any = None
    token_type_ids: Any = None
    positions: Any = None
    cu_seqlens: Any = None  # int32 on device
    lengths_host: Any = None  # np.int64 [B] per sorted sequence
    cu_host: Any = None  # np.int64 [B+1]
    tenants: list = field(default_factory=list)  # distinct residents (None = base only)
    tenant_of_seq: Any = None  # np.int64 [B]: index into tenants per sorted sequence
    rows: Any = None  # np.int64 [B, 9]: tenant_row() per sorted sequence
    tok_perm: Any = None  # np.int64 [T]: batch token index of each sorted token
    tok_seq: Any = None  # [T] sorted-sequence index of each token (mean pooling)
    cu64: Any = None  # int64 [B+1] on device
    position_offset: int = 0
    _pad_idx: Any = None  # [B, max_len] for padded attention (CPU path): built on first use
    _valid_flat: Any = None
    cls_rows: Any = None
    mean_rows: Any = None
    pooler_rows: Any = None
    groups: list[PetGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)
    layer_events: list = field(default_factory=list)  # per layer (+1 for heads): upload events to wait on
    seq_bounds: Any = None  # ([T] start, [T] end) of each token's sequence: attention builds it on first use
    packer: IndexPacker | None = None  # keeps the pinned index buffer alive until its copy is done
    skip_split: tuple[int, int] | None = None  # lower-layer skipping: (sequences, tokens) of the
    # non-skipping prefix; the skipping sequences are sorted after it (None: nobody skips)

    def prefix(self, n_seqs: int, n_tokens: int) -> "BatchPlan":
        """The plan of the first n_seqs sorted sequences (their PET groups only): what the lower
        layers run on when the other rows skip them."""
        cu = self.cu_host[:n_seqs + 1]
        sub = BatchPlan(num_seqs=n_seqs, num_tokens=n_tokens, max_len=int(self.lengths_host[:n_seqs].max()),
                        order=self.order[:n_seqs], input_ids=self.input_ids[:n_tokens],
                        token_type_ids=self.token_type_ids[:n_tokens] if self.token_type_ids is not None else None,
                        positions=self.positions[:n_tokens], cu_seqlens=self.cu_seqlens[:n_seqs + 1],
                        lengths_host=self.lengths_host[:n_seqs], cu_host=cu, tok_seq=self.tok_seq[:n_tokens],
                        cu64=self.cu64[:n_seqs + 1], position_offset=self.position_offset,
                        layer_events=self.layer_events)
        sub.groups = [g for g in self.groups if g.seg.t1 <= n_tokens]
        return sub

    @property
    def local_pos(self) -> torch.Tensor:
        """[T] position of each token inside its sequence (device)."""
        return self.positions - self.position_offset if self.position_offset else self.positions

    @property
    def pad_idx(self):
        if self._pad_idx is None:
            self._pad_idx = _pad_dev(self.cu64, self.max_len)
        return self._pad_idx

    @pad_idx.setter
    def pad_idx(self, v):
        self._pad_idx = v

    @property
    def valid_flat(self):
        if self._valid_flat is None:
            self._valid_flat = self.tok_seq * self.max_len + self.local_pos
        return self._valid_flat

    @valid_flat.setter
    def valid_flat(self, v):
        self._valid_flat = v

    @property
    def residents(self) -> list:
        """Resident per sorted sequence (a Python list: for tests and debugging, not the hot path)."""
        return [self.tenants[k] for k in self.tenant_of_seq.tolist()]

    def wait_layer(self, i: int) -> None:
        if i < len(self.layer_events) and self.layer_events[i]:
            stream = torch.cuda.current_stream()
            for ev in self.layer_events[i]:
                stream.wait_event(ev)


def _pad_index(lens, max_len: int, base: int = 0):
    """[n, max_len] token index (clamped) and flat valid positions, for sequences laid back to back."""
    lens_a = np.asarray(lens, dtype=np.int64)
    n = lens_a.size
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens_a[:-1], out=starts[1:])
    if base:
        starts += base
    pos = np.arange(max_len, dtype=np.int64)[None, :]
    idx = starts[:, None] + np.minimum(pos, lens_a[:, None] - 1)
    valid = np.flatnonzero(pos < lens_a[:, None])  # == row * max_len + col of each valid cell
    return idx, valid


def _dense_index(slots: np.ndarray):
    """Group rows by head slot: distinct slots [u], [u, m] row index (clamped, m = most rows of one
    slot) and each row's flat position in the [u * m] layout."""
    order = np.argsort(slots, kind="stable")
    uslots, start, counts = np.unique(slots[order], return_index=True, return_counts=True)
    m = int(counts.max())
    idx, _ = _pad_index(counts, m)
    k = np.repeat(np.arange(uslots.size, dtype=np.int64), counts)
    back = np.empty(slots.size, dtype=np.int64)
    back[order] = k * m + (np.arange(slots.size, dtype=np.int64) - start[k])
    return uslots.astype(np.int64), order[idx], back


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


_BANK_CODES: dict[str, int] = {}  # bank key -> small int (grouping only; any stable order works)
_TASK_CODES = {"seq_cls": 0, "token_cls": 1}
_NONE_ROW = (NONE_CODE, -1, 0, -1, -1, -1, 0, -1, 0)


def _bank_code(bank) -> int:
    if bank is None:
        return -1
    code = _BANK_CODES.get(bank.key)
    if code is None:
        code = _BANK_CODES.setdefault(bank.key, len(_BANK_CODES))
    return code


def tenant_row(r) -> tuple:
    """A resident's plan attributes as one int tuple, computed once per Resident and cached on it:
    (pet code, bank code, sort slot, slot, head bank code, head slot, n labels, task code, pool code)."""
    if r is None:
        return _NONE_ROW
    if r.plan_row is None:
        hb = r.head_bank
        r.plan_row = (PET_CODES[r.pet_type], _bank_code(r.bank), int(r.sort_slot), int(r.slot),
                      _bank_code(hb) if hb is not None else -1, int(r.head_slot) if hb is not None else -1,
                      int(r.n_labels), _TASK_CODES.get(r.task, 0), POOL_CODES.get(r.pooling, 0))
    return r.plan_row


def unique_tenants(residents: list) -> tuple[list, np.ndarray]:
    """Per-sequence residents (or None) -> (unique list, per-sequence index into it)."""
    seen: dict[int, int] = {}
    uniq: list = []
    idx = np.empty(len(residents), dtype=np.int64)
    for b, r in enumerate(residents):
        k = seen.get(id(r))
        if k is None:
            k = seen[id(r)] = len(uniq)
            uniq.append(r)
        idx[b] = k
    return uniq, idx


def _as_np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def build_plan(input_ids, token_type_ids, cu_seqlens, residents: list, position_offset: int,
               device: torch.device, want_tiles: bool, stream=None, tenant_index=None, seqs=None,
               skip=None) -> BatchPlan:
    """Two calling forms:

    * ``residents[b]`` is the Resident of original sequence b (None: base-only, no head);
    * ``tenant_index`` given: ``residents`` is the list of distinct residents (None allowed) and
      ``tenant_index[b]`` the index of sequence b's resident in it (what the runtime passes).

    ``seqs`` (optional, sorted original sequence indices) computes only those sequences; the
    others (failed tenants) are left out of the plan. ``plan.order[j]`` is always the ORIGINAL
    batch index of sorted sequence j. ``skip`` (bool per distinct resident, lower-layer
    skipping; False for None) sorts the skipping sequences after all others and sets
    ``plan.skip_split``. Everything is whole-array numpy: no Python loop per sequence or token (only per PET group / head group, bounded by config diversity, and per
    tenant of the bank-less diff / MaskBERT groups).
    """
    cu_all = _as_np(cu_seqlens).astype(np.int64, copy=False)
    if tenant_index is None:
        uniq, tidx = unique_tenants(residents)
    else:
        uniq, tidx = list(residents), np.asarray(tenant_index, dtype=np.int64)
    nf = len(_NONE_ROW)
    rows = np.fromiter(itertools.chain.from_iterable([tenant_row(r) for r in uniq] + [_NONE_ROW]),
                       dtype=np.int64, count=(len(uniq) + 1) * nf).reshape(-1, nf)
    sel = np.arange(cu_all.size - 1, dtype=np.int64) if seqs is None else np.asarray(seqs, dtype=np.int64)
    trow = rows[tidx[sel]]  # [n, 9] per (selected) sequence
    skip_seq = np.asarray(skip, dtype=bool)[tidx[sel]] if skip is not None else None
    order_local = np.lexsort((trow[:, 2], trow[:, 1], trow[:, 0]) +
                             ((skip_seq,) if skip_seq is not None else ()))  # stable: ties keep batch order
    order = sel[order_local]
    tr = trow[order_local]
    ten_sorted = tidx[order]  # index into uniq per sorted sequence
    old_start = cu_all[:-1][order]
    lens = cu_all[1:][order] - old_start
    B = int(lens.size)
    new_cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lens, out=new_cu[1:])
    T, max_len = int(new_cu[-1]), int(lens.max())

    tok_seq = np.repeat(np.arange(B, dtype=np.int64), lens)
    local = np.arange(T, dtype=np.int64) - new_cu[:-1][tok_seq]  # position inside its sequence
    tok_perm = old_start[tok_seq] + local
    pk = IndexPacker()
    h_ids = pk.add(_as_np(input_ids)[tok_perm])
    h_tt = pk.add(_as_np(token_type_ids)[tok_perm]) if token_type_ids is not None else None
    h_pos = pk.add(local + position_offset if position_offset else local)
    h_cu = pk.add(new_cu)
    h_tokseq = pk.add(tok_seq)
    h_cls = pk.add(new_cu[:-1])

    plan = BatchPlan(num_seqs=B, num_tokens=T, max_len=max_len, order=order,
                     lengths_host=lens, cu_host=new_cu)
    plan.tenants, plan.tenant_of_seq, plan.rows, plan.tok_perm = uniq, ten_sorted, tr, tok_perm

    # PET groups: runs of sorted sequences with the same (pet_type, bank); base-only rows excluded.
    pet, bank = tr[:, 0], tr[:, 1]
    brk = (pet[1:] != pet[:-1]) | (bank[1:] != bank[:-1])
    if skip_seq is not None:
        sk = skip_seq[order_local]
        brk |= sk[1:] != sk[:-1]  # a PET group never straddles the skipping boundary
        ns = int(B - sk.sum())
        plan.skip_split = (ns, int(new_cu[ns]))
    cut = np.flatnonzero(brk) + 1
    starts = np.concatenate([[0], cut]).astype(np.int64)
    ends = np.concatenate([cut, [B]]).astype(np.int64)
    group_handles = []
    for j, k in zip(starts.tolist(), ends.tolist()):
        if pet[j] == NONE_CODE:
            continue
        r = uniq[ten_sorted[j]]
        g_lens = lens[j:k]
        t0, t1 = int(new_cu[j]), int(new_cu[k])
        seg = Segments(t0=t0, t1=t1, max_len=int(g_lens.max()))
        tenants = []
        if r.bank is None:  # per-tenant ops: contiguous range of each tenant (sorted by sort_slot)
            ts = ten_sorted[j:k]
            tcut = np.flatnonzero(ts[1:] != ts[:-1]) + 1 + j
            for s, e in zip(np.concatenate([[j], tcut]).tolist(), np.concatenate([tcut, [k]]).tolist()):
                tenants.append((uniq[ten_sorted[s]], int(new_cu[s]), int(new_cu[e])))
            hs = None
        else:
            slots = tr[j:k, 3]
            seg._src = (j, k)
            hs = [pk.add(slots)]
            if want_tiles:
                tiles = _tiles(g_lens, slots)
                seg.n_tiles = tiles.shape[1]
                hs.append(pk.add(tiles))
        group_handles.append(hs)
        plan.groups.append(PetGroup(r.pet_type, r.bank, seg, tenants))

    # Pooling rows and head groups (heads are independent of the PET grouping).
    pool_kind = tr[:, 8]
    h_mean = pk.add(np.flatnonzero(pool_kind == 1))
    h_pooler = pk.add(np.flatnonzero(pool_kind == 2))
    head_code, task = tr[:, 4], tr[:, 7]
    head_handles = []
    for hc in np.unique(head_code[head_code >= 0]).tolist():
        members = head_code == hc
        seq_pos = np.flatnonzero(members & (task == 0))
        tok_pos = np.flatnonzero(members & (task == 1))
        first = int(seq_pos[0] if seq_pos.size else tok_pos[0])
        hg = HeadGroup(bank=uniq[ten_sorted[first]].head_bank, seq_order=seq_pos.tolist(), tok_order=tok_pos.tolist())
        hg.seq_pos, hg.tok_pos = seq_pos, tok_pos
        hh = {}
        if seq_pos.size:
            hh["seq"] = (pk.add(seq_pos), pk.add(tr[seq_pos, 5]), pk.add(tr[seq_pos, 6]))
            if hg.bank.get("dense_weight") is not None:  # two-layer head: rows per distinct tenant
                hh["dense"] = tuple(pk.add(a) for a in _dense_index(tr[seq_pos, 5]))
        if tok_pos.size:
            tl = lens[tok_pos]
            hg.tok_lens = tl.tolist()
            hg.tok_lens_np = tl
            idx, vf = _pad_index(tl, int(tl.max()))
            # absolute token index: sequence s's tokens start at new_cu[s]
            idx = idx - np.concatenate([[0], np.cumsum(tl)[:-1]])[:, None] + new_cu[tok_pos][:, None]
            hh["tok"] = (pk.add(idx), pk.add(vf), pk.add(tr[tok_pos, 5]), pk.add(tr[tok_pos, 6]))
        head_handles.append(hh)
        plan.heads.append(hg)

    dev = pk.ship(device, stream)
    plan.input_ids = dev[h_ids]
    plan.token_type_ids = dev[h_tt] if h_tt is not None else None
    plan.positions = dev[h_pos]
    plan.cu64 = dev[h_cu]
    plan.cu_seqlens = plan.cu64.to(torch.int32)
    plan.position_offset = position_offset
    plan.tok_seq = dev[h_tokseq]
    plan.cls_rows, plan.mean_rows, plan.pooler_rows = dev[h_cls], dev[h_mean], dev[h_pooler]
    for g, hs in zip(plan.groups, group_handles):
        if hs is None:
            continue
        g.seg.seq_slots = dev[hs[0]]
        g.seg._src = (plan.cu64, plan.tok_seq, plan.positions, position_offset) + g.seg._src
        if want_tiles:
            g.seg.tiles = dev[hs[1]]
    for hg, hh in zip(plan.heads, head_handles):
        if "seq" in hh:
            hg.seq_rows, hg.seq_slots, hg.seq_nlabels = (dev[h] for h in hh["seq"])
        if "dense" in hh:
            hg.dense_slots, hg.dense_idx, hg.dense_back = (dev[h] for h in hh["dense"])
        if "tok" in hh:
            hg.tok_pad_idx, hg.tok_valid_flat, hg.tok_slots, hg.tok_nlabels = (dev[h] for h in hh["tok"])
    plan.packer = pk
    return plan
