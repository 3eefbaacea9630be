"""Sliding-window rates from the worker's load counts (requests and tokens per partition and
tenant, arrivals from the high-water mark), computed in the worker and reported in its heartbeat."""

from __future__ import annotations

from collections import deque
from typing import Any


class LoadWindow:
    def __init__(self, window_s: float, top_tenants: int = 20):
        self.window_s = window_s
        self.top_tenants = top_tenants
        self._samples: deque[tuple[float, dict[int, dict[str, list[int]]]]] = deque()
        self._hw: deque[tuple[float, dict[int, int]]] = deque()
        self._first_seen: dict[int, float] = {}  # partition -> when it appeared (a new owner has a short history)

    def add(self, now: float, counts: dict[int, dict[str, list[int]]], highwater: dict[int, int],
            owned: list[int]) -> None:
        for p in owned:
            self._first_seen.setdefault(p, now)
        for p in list(self._first_seen):
            if p not in owned:
                del self._first_seen[p]
        self._samples.append((now, counts))
        self._hw.append((now, dict(highwater)))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        while len(self._hw) > 1 and self._hw[1][0] <= now - self.window_s:
            self._hw.popleft()

    def report(self, now: float) -> dict[str, Any]:
        parts: dict[int, dict[str, Any]] = {}
        for p, since in self._first_seen.items():
            span = max(1e-3, min(self.window_s, now - since))
            req = tok = 0
            tenants: dict[str, float] = {}
            for t, counts in self._samples:
                if t < since:
                    continue
                for tenant, (r, k) in counts.get(p, {}).items():
                    req += r
                    tok += k
                    tenants[tenant] = tenants.get(tenant, 0.0) + k
            top = sorted(tenants.items(), key=lambda kv: -kv[1])[: self.top_tenants]
            parts[p] = {"requests_per_s": round(req / span, 3), "tokens_per_s": round(tok / span, 3),
                        "tenants": {t: round(k / span, 3) for t, k in top},
                        "arrivals_per_s": self._arrivals(p)}
        return {"requests_per_s": round(sum(v["requests_per_s"] for v in parts.values()), 3),
                "tokens_per_s": round(sum(v["tokens_per_s"] for v in parts.values()), 3),
                "partitions": {str(p): v for p, v in sorted(parts.items())}}

    def _arrivals(self, p: int) -> float | None:
        """Requests/s reaching the partition (demand), seen from its high-water mark."""
        pts = [(t, hw[p]) for t, hw in self._hw if p in hw]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
            return None
        return round(max(0, pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 3)
