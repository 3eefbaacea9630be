"""Adapter pool: device slot banks <- pinned host tier <- loader callback.

* Device tier: one SlotBank per bank key (PET type + shape bucket), preallocated when first
  needed, sized by PoolConfig (explicit slots per key, else default_slots, capped by the budget).
  Diff/MaskBERT tenants keep per-tenant device tensors under the same byte budget.
* LRU per bank with pinning: a tenant acquired by an in-flight batch cannot be evicted.
* Host tier: pinned, already converted HostDelta objects, LRU by bytes.
* Uploads run on a dedicated CUDA stream, layer-major, with one event per layer (+1 for heads and
  non-layer tensors), so batch n+1's uploads overlap batch n's compute and layer i of a batch only
  waits for layer i of its new adapters.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from schema.layout import BaseDims
from workers.engine.bank import SlotBank
from workers.engine.batch import TenantDelta
from workers.engine.convert import HostDelta, TenantMeta, to_host
from workers.engine.errors import AdapterLoadError, EngineError, PoolExhausted, UnknownTenant

Loader = Callable[[str], TenantDelta]


@dataclass
class PoolConfig:
    device_bytes: int = 2 << 30
    host_bytes: int = 4 << 30
    default_slots: int = 256
    slots: dict[str, int] = field(default_factory=dict)  # bank key -> slots, e.g. {"lora:r8:q,v": 10240}
    prefetch_threads: int = 2
    load_threads: int = 8  # a batch's cold misses load in parallel (store I/O, sha256, checks)


@dataclass(eq=False)
class Resident(TenantMeta):
    bank: SlotBank | None
    slot: int
    head_bank: SlotBank
    head_slot: int
    sparse: dict[str, torch.Tensor] | None
    sort_slot: int
    nbytes: int
    pins: int = 0
    stale: bool = False
    evicted: bool = False
    events: list | None = None  # per-layer upload events, dropped once complete
    plan_row: tuple | None = None  # plan.tenant_row(self), computed on first use
    info: Any = None  # runtime's TenantInfo of this resident, built on first use

    @property
    def bank_key(self) -> str | None:
        return self.bank.key if self.bank is not None else None

    @property
    def n_labels(self) -> int:
        return len(self.labels)


class AdapterPool:
    def __init__(self, dims: BaseDims, device: torch.device, dtype: torch.dtype, loader: Loader,
                 config: PoolConfig | None = None, has_pooler: bool = True):
        self.dims, self.device, self.dtype = dims, torch.device(device), dtype
        self.loader, self.config, self.has_pooler = loader, config or PoolConfig(), has_pooler
        if self.config.device_bytes <= 0:  # auto: a quarter of the GPU, 2 GiB elsewhere
            total = (torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda"
                     else 8 << 30)
            self.config = replace(self.config, device_bytes=total // 4)
        self.banks: dict[str, SlotBank] = {}
        self._free: dict[str, list[int]] = {}
        self._lru: dict[str, OrderedDict] = {}  # bank key (or "sparse") -> tenant_id -> Resident
        self.residents: dict[str, Resident] = {}
        self._host: OrderedDict[str, HostDelta] = OrderedDict()
        self._host_bytes = 0
        self._device_used = 0
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._cuda = self.device.type == "cuda"
        self.upload_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._prefetcher = ThreadPoolExecutor(self.config.prefetch_threads, thread_name_prefix="flock-prefetch")
        self._loads = ThreadPoolExecutor(max(1, self.config.load_threads), thread_name_prefix="flock-load")
        self.stats = {"loads": 0, "uploads": 0, "evictions": 0, "host_hits": 0, "device_hits": 0}

    # ---- host tier -------------------------------------------------------------------------
    def _load_host(self, tid: str) -> HostDelta:
        with self._lock:
            hd = self._host.get(tid)
            if hd is not None:
                self._host.move_to_end(tid)
                self.stats["host_hits"] += 1
                return hd
        try:
            delta = self.loader(tid)
        except EngineError:
            raise
        except KeyError as e:
            raise UnknownTenant(f"tenant {tid!r} unknown") from e
        except Exception as e:  # the store's failure must fail only this tenant
            raise AdapterLoadError(f"tenant {tid!r}: loader failed: {e!r}") from e
        if delta is None:
            raise UnknownTenant(f"tenant {tid!r} unknown")
        hd = to_host(delta, self.dims, self.dtype, self._cuda, self.has_pooler)
        with self._lock:
            self.stats["loads"] += 1
            old = self._host.pop(tid, None)  # a concurrent prefetch may have loaded it too
            if old is not None:
                self._host_bytes -= old.nbytes
            self._host[tid] = hd
            self._host_bytes += hd.nbytes
            while self._host_bytes > self.config.host_bytes and len(self._host) > 1:
                _, old = self._host.popitem(last=False)
                self._host_bytes -= old.nbytes
        return hd

    # ---- device tier -----------------------------------------------------------------------
    def _bank(self, layout) -> SlotBank:
        bank = self.banks.get(layout.key)
        if bank is not None:
            return bank
        slot_bytes = layout.slot_elems() * torch.empty((), dtype=self.dtype).element_size()
        want = self.config.slots.get(layout.key, self.config.default_slots)
        fit = (self.config.device_bytes - self._device_used) // max(slot_bytes, 1)
        slots = int(min(want, fit))
        if slots < 1:
            raise PoolExhausted(f"no device budget left for bank {layout.key}")
        bank = SlotBank(layout, slots, self.device, self.dtype)
        self._device_used += bank.nbytes()
        self.banks[layout.key] = bank
        self._free[layout.key] = list(range(slots - 1, -1, -1))
        self._lru[layout.key] = OrderedDict()
        return bank

    def _evict(self, res: Resident) -> None:
        if res.evicted:
            return
        res.evicted = True
        if self.residents.get(res.tenant_id) is res:
            del self.residents[res.tenant_id]
        self.stats["evictions"] += 1
        for b, s in ((res.bank, res.slot), (res.head_bank, res.head_slot)):
            if b is not None:
                if self._lru[b.key].get(res.tenant_id) is res:
                    del self._lru[b.key][res.tenant_id]
                self._free[b.key].append(s)
        if res.nbytes:
            lru = self._lru["sparse"]
            if lru.get(res.tenant_id) is res:
                del lru[res.tenant_id]
            self._device_used -= res.nbytes
        res.sparse = None

    def _take_slot(self, bank: SlotBank, protect: set) -> int:
        free = self._free[bank.key]
        if not free:
            for tid, r in self._lru[bank.key].items():  # oldest first
                if r.pins == 0 and tid not in protect:
                    self._evict(r)
                    break
        if not free:
            raise PoolExhausted(f"all {bank.slots} slots of bank {bank.key} are in use by in-flight batches")
        return free.pop()

    def _make_room_sparse(self, nbytes: int, protect: set) -> None:
        lru = self._lru.setdefault("sparse", OrderedDict())
        while self._device_used + nbytes > self.config.device_bytes:
            victim = next((r for t, r in lru.items() if r.pins == 0 and t not in protect), None)
            if victim is None:
                raise PoolExhausted("no device budget for a sparse (diff/maskbert) tenant")
            self._evict(victim)

    def _place(self, hd: HostDelta, protect: set) -> Resident:
        """Reserve slots for a host delta (no copy yet). Caller holds the lock."""
        head_bank = self._bank(hd.head_layout)
        bank = self._bank(hd.bank_layout) if hd.bank_layout is not None else None
        slot = self._take_slot(bank, protect) if bank is not None else -1
        try:
            head_slot = self._take_slot(head_bank, protect)
        except PoolExhausted:
            if bank is not None:
                self._free[bank.key].append(slot)
            raise
        sparse_bytes = 0
        if hd.sparse is not None:
            sparse_bytes = sum(t.numel() * t.element_size() for t in hd.sparse.values())
            try:
                self._make_room_sparse(sparse_bytes, protect)
            except PoolExhausted:
                self._free[head_bank.key].append(head_slot)
                raise
            self._device_used += sparse_bytes
        res = Resident(hd.tenant_id, hd.version, hd.pet_type, hd.task, hd.pooling, hd.labels, bank, slot,
                       head_bank, head_slot, None, slot if bank is not None else next(self._ids), sparse_bytes)
        self.residents[hd.tenant_id] = res
        for b in (bank, head_bank):
            if b is not None:
                self._lru[b.key][hd.tenant_id] = res
        if hd.sparse is not None:
            self._lru["sparse"][hd.tenant_id] = res
        return res

    def _upload(self, items: list[tuple[Resident, HostDelta]]) -> None:
        """Copy host tensors into slots, layer-major, one event per layer (CUDA)."""
        if not items:
            return
        self.stats["uploads"] += len(items)
        L = self.dims.layers
        ctx = torch.cuda.stream(self.upload_stream) if self._cuda else contextlib.nullcontext()
        events = []
        with ctx:
            for res, hd in items:  # non-layer tensors (heads, sparse payloads) first: tiny
                for n, t in hd.head_tensors.items():
                    res.head_bank.tensors[n][res.head_slot].copy_(t, non_blocking=True)
                if hd.sparse is not None:
                    res.sparse = {n: t.to(self.device, non_blocking=True) for n, t in hd.sparse.items()}
                if hd.bank_tensors is not None:  # bank tensors not per layer (pooler deltas)
                    for n, spec in hd.bank_layout.specs.items():
                        if not spec.per_layer:
                            res.bank.tensors[n][res.slot].copy_(hd.bank_tensors[n], non_blocking=True)
            for i in range(L):
                for res, hd in items:
                    if hd.bank_tensors is None:
                        continue
                    for n, spec in hd.bank_layout.specs.items():
                        if spec.per_layer:
                            res.bank.tensors[n][res.slot, i].copy_(hd.bank_tensors[n][i], non_blocking=True)
                if self._cuda:
                    ev = torch.cuda.Event()
                    ev.record(self.upload_stream)
                    events.append(ev)
        if self._cuda:
            events.append(events[-1])  # heads were issued before layer 0: ready with it
            for res, _ in items:
                res.events = events

    # ---- public API ------------------------------------------------------------------------
    @torch.inference_mode()  # slot tensors are created and updated only in inference mode
    def acquire(self, tenant_ids) -> dict[str, Resident | EngineError]:
        """Make tenants resident and pin them. Per-tenant errors are returned, not raised."""
        out: dict[str, Resident | EngineError] = {}
        hosts: dict[str, HostDelta] = {}
        ids = list(dict.fromkeys(tenant_ids))  # distinct tenants: all work below is per tenant
        residents = self.residents
        with self._lock:
            need = [t for t in ids if (r := residents.get(t)) is None or r.stale]
        self._load_all(need, hosts, out)  # the loader may be slow: not under the lock
        with self._lock:
            protect = set(ids)
            new = []
            lru = self._lru
            hits = 0
            for tid in ids:
                if out and tid in out:
                    continue
                res = residents.get(tid)
                if res is not None and not res.stale:
                    hits += 1
                else:
                    if res is not None and res.pins == 0:
                        self._evict(res)
                    if tid not in hosts:  # placed and then evicted/staled since the first pass
                        try:
                            hosts[tid] = self._load_host(tid)
                        except EngineError as e:
                            out[tid] = e
                            continue
                    try:
                        res = self._place(hosts[tid], protect)
                    except EngineError as e:
                        out[tid] = e
                        continue
                    new.append((res, hosts[tid]))
                res.pins += 1
                for b in (res.bank, res.head_bank):  # LRU touch (inlined _touch)
                    if b is not None:
                        try:
                            lru[b.key].move_to_end(tid)
                        except KeyError:
                            pass
                out[tid] = res
            self.stats["device_hits"] += hits
            self._upload(new)
        return out

    def _load_all(self, need: list[str], hosts: dict, out: dict) -> None:
        """Host copies of the tenants in need; one cold tenant loads inline, several in parallel
        (each load is mostly I/O, hashing and tensor checks that release the GIL)."""
        if len(need) == 1 or self.config.load_threads <= 1:
            jobs = {tid: None for tid in need}
        else:
            jobs = {tid: self._loads.submit(self._load_host, tid) for tid in need}
        for tid, job in jobs.items():
            try:
                hosts[tid] = self._load_host(tid) if job is None else job.result()
            except EngineError as e:
                out[tid] = e

    def _touch(self, res: Resident) -> None:
        for b in (res.bank, res.head_bank):
            if b is not None and res.tenant_id in self._lru[b.key]:
                self._lru[b.key].move_to_end(res.tenant_id)

    def release(self, residents) -> None:
        with self._lock:
            for res in residents:
                res.pins -= 1
                if res.events is not None and all(e.query() for e in res.events):
                    res.events = None
                if res.pins == 0 and res.stale:
                    self._evict(res)

    def layer_events(self, residents) -> list[list]:
        """Distinct pending upload events per layer (+ heads) for a batch's residents."""
        if not self._cuda:
            return []
        per_layer: list[list] = [[] for _ in range(self.dims.layers + 1)]
        seen = set()
        for r in residents:
            if r.events is None or id(r.events) in seen:
                continue
            seen.add(id(r.events))
            for i, ev in enumerate(r.events):
                per_layer[i].append(ev)
        return per_layer

    def prefetch(self, tenant_ids) -> Future:
        """Load into the host tier and upload into free/evictable slots, without pinning."""
        ids = list(tenant_ids)

        def work():
            ok = 0
            for chunk in range(0, len(ids), 256):
                got = self.acquire(ids[chunk:chunk + 256])
                self.release([r for r in got.values() if isinstance(r, Resident)])
                ok += sum(isinstance(r, Resident) for r in got.values())
            return ok
        return self._prefetcher.submit(work)

    def invalidate(self, tenant_id: str) -> None:
        """A new adapter version exists: drop the host copy; the device copy goes once unpinned."""
        with self._lock:
            hd = self._host.pop(tenant_id, None)
            if hd is not None:
                self._host_bytes -= hd.nbytes
            res = self.residents.get(tenant_id)
            if res is not None:
                res.stale = True
                if res.pins == 0:
                    self._evict(res)

    def evict(self, tenant_id: str) -> bool:
        """Drop a tenant from the device tier (if unpinned). The host copy stays."""
        with self._lock:
            res = self.residents.get(tenant_id)
            if res is None or res.pins:
                return False
            self._evict(res)
            return True

    def recent(self, n: int) -> list[str]:
        """Up to n resident tenants, most recently used first (banks interleaved): what a load
        report names when the resident set is too large to list. Read without the lock: a
        snapshot, possibly one placement stale."""
        orders = [reversed(list(lru)) for lru in list(self._lru.values())]
        out: dict[str, None] = {}
        for row in itertools.zip_longest(*orders):
            for tid in row:
                if tid is not None and tid in self.residents:
                    out[tid] = None
            if len(out) >= n:
                break
        return list(out)[:n]

    def tier(self, tenant_id: str) -> str | None:
        """Where a tenant's adapter is now: "device" (a slot), "host" (pinned host copy only) or None."""
        res = self.residents.get(tenant_id)
        if res is not None and not res.stale:
            return "device"
        return "host" if tenant_id in self._host else None

    def free_bytes(self) -> int:
        """Device budget still free for adapters: bytes no bank holds yet plus the free slots of
        the banks already allocated. Read without the pool lock (a load report must not wait for
        a batch's loads): a snapshot, possibly one placement stale."""
        free = self.config.device_bytes - self._device_used
        return int(free + sum(len(self._free.get(k, ())) * b.slot_bytes() for k, b in list(self.banks.items())))

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self._loads.shutdown(wait=False, cancel_futures=True)

