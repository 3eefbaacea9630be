"""The tri-gram table: key -> [3, h] window states, hot rows on the device, the rest in pinned
host memory, each tier with a byte budget and LRU.

Lookup is one ``torch.searchsorted`` of a batch's distinct keys in one sorted key array (both
tiers; a row's ``loc`` is its device row, or -1 - its host row), no per-token Python. A batch
syncs once to learn which keys are on the host or missing: host rows are copied up (and promoted
to the device tier), missing ones computed by the caller's function in the same batch and
inserted. Device rows evicted to make room move down to the host tier (whose LRU rows are dropped).
At most ``insert_rows`` missing keys per batch are admitted (the rest are computed and used, not
kept): a batch of novel text then costs its computation, not a demotion of a whole batch's rows
through the host tier (the H200 study measured 0.02-0.13x on such batches without the cap).
The states a batch gets never depend on capacity: a full table only means more recomputation.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class PlotTable:
    def __init__(self, hidden: int, device: torch.device | str, dtype: torch.dtype, device_bytes: int,
                 host_bytes: int, insert_rows: int = 8192):
        self.device, self.dtype, self.hidden = torch.device(device), dtype, hidden
        self.insert_rows = max(0, int(insert_rows))
        self.row_bytes = 3 * hidden * torch.empty((), dtype=dtype).element_size()
        self.cap_dev = max(1, int(device_bytes) // self.row_bytes)
        self.cap_host = max(0, int(host_bytes) // self.row_bytes)
        # Storage grows (doubling) up to the budget as rows arrive: an idle skipping base holds
        # no gigabytes of device or pinned memory it does not use.
        self.dev_vals = self.host_vals = self.dev_key = self.dev_used = self.host_key = self.host_used = None
        self._grow("dev", 0)
        self._grow("host", 0)
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)  # sorted, both tiers
        self.loc = torch.empty(0, dtype=torch.long, device=self.device)
        self.tick = 0
        self.stats = {"batches": 0, "lookups": 0, "hits_device": 0, "hits_host": 0, "misses": 0,
                      "dropped": 0, "not_admitted": 0, "lookup_seconds": 0.0, "compute_seconds": 0.0, "last_lookup_ms": 0.0,
                      "last_compute_ms": 0.0}

    # ---- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.keys.numel())

    def rows(self) -> tuple[int, int]:
        """(device rows, host rows) in use."""
        return int((self.dev_key >= 0).sum()), int((self.host_key >= 0).sum())

    def report(self) -> dict:
        d, h = self.rows()
        s = dict(self.stats)
        looked = s["lookups"]
        s.update(device_rows=d, host_rows=h, device_capacity=self.cap_dev, host_capacity=self.cap_host,
                 device_bytes=d * self.row_bytes, host_bytes=h * self.row_bytes,
                 hit_rate=(s["hits_device"] + s["hits_host"]) / looked if looked else None)
        return s

    # ---- lookup --------------------------------------------------------------------------
    def get(self, keys: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Values [U, 3, h] of U DISTINCT keys (device); ``compute(missing keys)`` gives [m, 3, h]
        for the keys the table lacks, which are then inserted."""
        t0 = time.perf_counter()
        self.tick += 1
        U = keys.numel()
        out = torch.empty(U, 3, self.hidden, device=self.device, dtype=self.dtype)
        n = self.keys.numel()
        if n:
            pos = torch.searchsorted(self.keys, keys).clamp_max(n - 1)
            found = self.keys.index_select(0, pos) == keys
            loc = self.loc.index_select(0, pos)
        else:
            found = torch.zeros(U, dtype=torch.bool, device=self.device)
            loc = torch.zeros(U, dtype=torch.long, device=self.device)
        kind = torch.where(found, torch.where(loc >= 0, 0, 1), 2).cpu()  # the batch's one sync
        dev_i, host_i, miss_i = ((kind == k).nonzero().squeeze(1) for k in range(3))
        if dev_i.numel():
            di = dev_i.to(self.device, non_blocking=True)
            rows = loc.index_select(0, di)
            out[di] = self.dev_vals.index_select(0, rows)
            self.dev_used[rows] = self.tick
        new_keys, new_vals = [], []
        if host_i.numel():
            hrows = -1 - loc.index_select(0, host_i.to(self.device)).cpu()
            v = self.host_vals.index_select(0, hrows)
            hi = host_i.to(self.device, non_blocking=True)
            v = v.to(self.device, non_blocking=True)
            out[hi] = v
            self.host_key[hrows] = -1  # promoted: leaves the host tier
            new_keys.append(keys.index_select(0, hi))
            new_vals.append(v)
        self.stats["lookup_seconds"] += (t1 := time.perf_counter()) - t0
        self.stats["last_lookup_ms"] = (t1 - t0) * 1e3
        if miss_i.numel():
            mi = miss_i.to(self.device, non_blocking=True)
            mk = keys.index_select(0, mi)
            v = compute(mk).to(self.dtype)
            out[mi] = v
            admit = max(0, min(mk.numel(), self.insert_rows - sum(k.numel() for k in new_keys)))
            self.stats["not_admitted"] += mk.numel() - admit
            if admit:
                new_keys.append(mk[:admit])
                new_vals.append(v[:admit])
        t2 = time.perf_counter()
        self.stats["compute_seconds"] += t2 - t1
        self.stats["last_compute_ms"] = (t2 - t1) * 1e3
        if new_keys:
            self.insert(torch.cat(new_keys), torch.cat(new_vals))
        s = self.stats
        s["batches"] += 1
        s["lookups"] += U
        s["hits_device"] += int(dev_i.numel())
        s["hits_host"] += int(host_i.numel())
        s["misses"] += int(miss_i.numel())
        return out

    # ---- insertion and eviction ------------------------------------------------------------
    def _grow(self, tier: str, rows: int) -> None:
        """Make at least ``rows`` rows of a tier allocated (capped by its budget)."""
        dev = tier == "dev"
        cap = self.cap_dev if dev else self.cap_host
        vals = self.dev_vals if dev else self.host_vals
        have = 0 if vals is None else vals.shape[0]
        if vals is not None and (rows <= have or have == cap):
            return
        n = min(cap, max(rows, 2 * have, min(cap, 1024)))
        where = self.device if dev else torch.device("cpu")
        new_vals = torch.empty(n, 3, self.hidden, device=where, dtype=self.dtype,
                               pin_memory=not dev and self.device.type == "cuda")
        new_key = torch.full((n,), -1, dtype=torch.long, device=where)
        new_used = torch.zeros(n, dtype=torch.long, device=where)
        if have:
            new_vals[:have] = vals
            new_key[:have] = self.dev_key if dev else self.host_key
            new_used[:have] = self.dev_used if dev else self.host_used
        if dev:
            self.dev_vals, self.dev_key, self.dev_used = new_vals, new_key, new_used
        else:
            self.host_vals, self.host_key, self.host_used = new_vals, new_key, new_used

    def insert(self, keys: torch.Tensor, vals: torch.Tensor) -> None:
        """Put (distinct, absent) keys into the device tier; LRU device rows not used by this
        batch move down to the host tier. Keys beyond what fits are not kept."""
        keys, vals = keys.to(self.device), vals.to(self.device, self.dtype)
        self._grow("dev", int((self.dev_key >= 0).sum()) + keys.numel())
        free_score = torch.where(self.dev_key < 0, -1, self.dev_used)
        free_score = torch.where(self.dev_used == self.tick, torch.iinfo(torch.long).max, free_score)
        fit = min(keys.numel(), int((free_score < self.tick).sum()))
        if fit < keys.numel():
            self.stats["dropped"] += keys.numel() - fit
            keys, vals = keys[:fit], vals[:fit]
        if fit:
            rows = torch.topk(free_score, fit, largest=False).indices
            old = self.dev_key.index_select(0, rows)
            moved = old >= 0
            if bool(moved.any()):
                self._demote(old[moved], self.dev_vals.index_select(0, rows[moved]),
                             self.dev_used.index_select(0, rows[moved]))
            self.dev_vals[rows] = vals
            self.dev_key[rows] = keys
            self.dev_used[rows] = self.tick
        self._reindex()

    def _demote(self, keys: torch.Tensor, vals: torch.Tensor, used: torch.Tensor) -> None:
        m = min(keys.numel(), self.cap_host)
        if m < keys.numel():  # keep the most recently used of the evicted rows
            keep = torch.topk(used, m).indices
            keys, vals, used = keys[keep], vals[keep], used[keep]
        if not m:
            return
        self._grow("host", int((self.host_key >= 0).sum()) + m)
        score = torch.where(self.host_key < 0, -1, self.host_used)
        rows = torch.topk(score, m, largest=False).indices
        self.host_vals[rows] = vals.to("cpu", non_blocking=False)
        self.host_key[rows] = keys.cpu()
        self.host_used[rows] = used.cpu()

    def _reindex(self) -> None:
        dmask = self.dev_key >= 0
        hmask = self.host_key >= 0
        drows = dmask.nonzero().squeeze(1)
        hrows = hmask.nonzero().squeeze(1)
        k = torch.cat([self.dev_key.index_select(0, drows), self.host_key.index_select(0, hrows).to(self.device)])
        loc = torch.cat([drows, (-1 - hrows).to(self.device)])
        k, order = torch.sort(k)
        self.keys, self.loc = k, loc.index_select(0, order)

    def load(self, keys: torch.Tensor, vals: torch.Tensor) -> int:
        """Fill an empty table from a saved one, most useful rows first (the file's order): device
        rows, then host rows; returns how many rows were kept."""
        nd = min(keys.numel(), self.cap_dev)
        nh = min(keys.numel() - nd, self.cap_host)
        self._grow("dev", nd)
        self._grow("host", nh)
        self.dev_vals[:nd] = vals[:nd].to(self.device, self.dtype)
        self.dev_key[:nd] = keys[:nd].to(self.device)
        if nh:
            self.host_vals[:nh] = vals[nd:nd + nh].to(self.dtype)
            self.host_key[:nh] = keys[nd:nd + nh]
        self._reindex()
        return nd + nh
