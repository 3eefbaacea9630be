"""Sliding-window rates from the worker's load counts (requests and tokens per partition and
tenant, arrivals from the high-water mark), computed in the worker and reported in its heartbeat.

Bounded in tenants: each sample keeps a partition's exact totals but only its ``keep`` heaviest
tenants (tokens), so the window's memory is samples x partitions x keep and the report carries
``top_tenants`` heavy hitters per partition plus exact aggregates, however many tenants send.
A tenant that is heavy over the window is heavy in most of its samples, so the per-sample cut
(several times top_tenants) loses only tenants far below the reported ones."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _PartSample:
    requests: int
    tokens: int
    tenants: dict[str, int]  # the sample's heaviest tenants -> tokens
    distinct: int  # tenants seen in the sample (before the cut)


class LoadWindow:
    def __init__(self, window_s: float, top_tenants: int = 20, keep: int | None = None):
        self.window_s = window_s
        self.top_tenants = top_tenants
        self.keep = keep if keep is not None else max(4 * top_tenants, 64)
        self._samples: deque[tuple[float, dict[int, _PartSample]]] = deque()
        self._hw: deque[tuple[float, dict[int, int]]] = deque()
        self._first_seen: dict[int, float] = {}  # partition -> when it appeared (a new owner has a short history)

    def add(self, now: float, counts: dict[int, dict[str, list[int]]], highwater: dict[int, int],
            owned: list[int]) -> None:
        for p in owned:
            self._first_seen.setdefault(p, now)
        for p in list(self._first_seen):
            if p not in owned:
                del self._first_seen[p]
        self._samples.append((now, {p: self._compact(c) for p, c in counts.items()}))
        self._hw.append((now, dict(highwater)))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        while len(self._hw) > 1 and self._hw[1][0] <= now - self.window_s:
            self._hw.popleft()

    def _compact(self, counts: dict[str, list[int]]) -> _PartSample:
        req = sum(r for r, _ in counts.values())
        tok = sum(k for _, k in counts.values())
        items = ((t, k) for t, (_, k) in counts.items())
        top = (heapq.nlargest(self.keep, items, key=lambda kv: kv[1]) if len(counts) > self.keep else items)
        return _PartSample(req, tok, dict(top), len(counts))

    def held_tenants(self) -> int:
        """Tenant entries the window holds (bounded by samples x partitions x keep)."""
        return sum(len(ps.tenants) for _, parts in self._samples for ps in parts.values())

    def report(self, now: float) -> dict[str, Any]:
        parts: dict[int, dict[str, Any]] = {}
        for p, since in self._first_seen.items():
            span = max(1e-3, min(self.window_s, now - since))
            req = tok = distinct = 0
            tenants: dict[str, float] = {}
            for t, sample in self._samples:
                ps = sample.get(p)
                if t < since or ps is None:
                    continue
                req += ps.requests
                tok += ps.tokens
                distinct = max(distinct, ps.distinct)
                for tenant, k in ps.tenants.items():
                    tenants[tenant] = tenants.get(tenant, 0.0) + k
            top = heapq.nlargest(self.top_tenants, tenants.items(), key=lambda kv: kv[1])
            parts[p] = {"requests_per_s": round(req / span, 3), "tokens_per_s": round(tok / span, 3),
                        "tenants": {t: round(k / span, 3) for t, k in top},
                        # most tenants seen in one heartbeat interval (a lower bound of the window's)
                        "active_tenants": distinct, "arrivals_per_s": self._arrivals(p)}
        return {"requests_per_s": round(sum(v["requests_per_s"] for v in parts.values()), 3),
                "tokens_per_s": round(sum(v["tokens_per_s"] for v in parts.values()), 3),
                "partitions": {str(p): v for p, v in sorted(parts.items())}}

    def _arrivals(self, p: int) -> float | None:
        """Requests/s reaching the partition (demand), seen from its high-water mark."""
        pts = [(t, hw[p]) for t, hw in self._hw if p in hw]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
            return None
        return round(max(0, pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 3)
