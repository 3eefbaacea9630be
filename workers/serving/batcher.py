"""Coordinated batching of many tenants' requests into one engine batch (PetS's idea, online).

Pure logic, no I/O, so its policy is unit-testable:
- a token budget and a sequence cap per batch; a batch is cut when it is full or when the
  oldest waiting request has waited ``max_wait_ms``;
- earliest deadline first, round-robin across tenants (one request per tenant per round, so a
  hot tenant cannot starve the rest), a cap on distinct tenants per batch;
- length-aware packing: a request that does not fit the remaining budget is passed over for
  shorter ones, and the batch goes out sorted by length (the attention kernels bucket by length);
- requests already past their deadline come back as expired, without compute;
- ``upcoming_tenants`` gives the engine look-ahead for adapter prefetch.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchPolicy:
    max_tokens: int = 16384
    max_seqs: int = 256
    max_tenants: int = 128
    max_wait_ms: float = 10.0
    default_slo_ms: float = 30_000.0  # urgency given to requests without a deadline


@dataclass
class Pending:
    """One decoded, tokenised request waiting for compute."""

    tenant_id: str
    n_tokens: int
    arrived_ms: float
    deadline_ms: float | None
    payload: Any = None  # whatever the caller needs back (request, partition, offset, ids)
    seq: int = 0
    urgency_ms: float = field(init=False)

    def __post_init__(self):
        self.urgency_ms = self.deadline_ms if self.deadline_ms is not None else float("inf")


class CoordinatedBatcher:
    def __init__(self, policy: BatchPolicy | None = None):
        self.policy = policy or BatchPolicy()
        self._queues: dict[str, deque[Pending]] = {}
        self._count = 0
        self._tokens = 0
        self._seq = itertools.count()
        self._oldest: list[tuple[float, int]] = []  # heap of (arrived, seq) for the max-wait timer
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, seq): expiry needs no scan
        self._live: set[int] = set()

    def __len__(self) -> int:
        return self._count

    @property
    def queued_tokens(self) -> int:
        return self._tokens

    def add(self, item: Pending) -> None:
        item.seq = next(self._seq)
        if item.deadline_ms is None:
            item.urgency_ms = item.arrived_ms + self.policy.default_slo_ms
        q = self._queues.setdefault(item.tenant_id, deque())
        # Per-tenant queues stay ordered by urgency; arrivals are nearly always in order.
        if q and q[-1].urgency_ms > item.urgency_ms:
            items = sorted([*q, item], key=lambda p: (p.urgency_ms, p.seq))
            q.clear()
            q.extend(items)
        else:
            q.append(item)
        self._count += 1
        self._tokens += item.n_tokens
        heapq.heappush(self._oldest, (item.arrived_ms, item.seq))
        if item.deadline_ms is not None:
            heapq.heappush(self._deadlines, (item.deadline_ms, item.seq))
        self._live.add(item.seq)

    def _oldest_arrival(self) -> float | None:
        while self._oldest and self._oldest[0][1] not in self._live:
            heapq.heappop(self._oldest)
        return self._oldest[0][0] if self._oldest else None

    def ready(self, now_ms: float) -> bool:
        """A batch should go out now: enough work for a full batch, or someone waited long enough."""
        if not self._count:
            return False
        if self._tokens >= self.policy.max_tokens or self._count >= self.policy.max_seqs:
            return True
        oldest = self._oldest_arrival()
        return oldest is not None and now_ms - oldest >= self.policy.max_wait_ms

    def wait_ms(self, now_ms: float) -> float:
        """How long until ``ready`` turns true by itself (inf when empty)."""
        oldest = self._oldest_arrival()
        if oldest is None:
            return float("inf")
        return max(0.0, self.policy.max_wait_ms - (now_ms - oldest))

    def _remove(self, item: Pending) -> None:
        self._count -= 1
        self._tokens -= item.n_tokens
        self._live.discard(item.seq)

    def take_expired(self, now_ms: float) -> list[Pending]:
        # Only when some queued request's deadline has passed is the queue scanned (a backlog
        # of requests without deadlines costs nothing here per batch).
        d = self._deadlines
        while d and d[0][1] not in self._live:
            heapq.heappop(d)
        if not d or d[0][0] > now_ms:
            return []
        while d and d[0][0] <= now_ms:
            heapq.heappop(d)
        expired = []
        for tenant in list(self._queues):
            q = self._queues[tenant]
            keep = deque()
            for p in q:
                if p.deadline_ms is not None and p.deadline_ms <= now_ms:
                    expired.append(p)
                    self._remove(p)
                else:
                    keep.append(p)
            if keep:
                self._queues[tenant] = keep
            else:
                del self._queues[tenant]
        return expired

    def next_batch(self, now_ms: float) -> tuple[list[Pending], list[Pending]]:
        """(batch to run, requests that expired). The batch may be empty."""
        expired = self.take_expired(now_ms)
        pol = self.policy
        # Tenants in order of their most urgent request; round-robin one request per tenant.
        order = sorted(self._queues, key=lambda t: (self._queues[t][0].urgency_ms, self._queues[t][0].seq))
        order = order[: pol.max_tenants]
        batch: list[Pending] = []
        tokens = 0
        active = deque(order)
        while active and len(batch) < pol.max_seqs:
            tenant = active.popleft()
            q = self._queues[tenant]
            room = pol.max_tokens - tokens
            # Length-aware: the most urgent request of this tenant that still fits the budget.
            pick = q[0] if q[0].n_tokens <= room else next((p for p in q if p.n_tokens <= room), None)
            if pick is None:
                if not batch and q:  # a single request larger than the budget still runs alone
                    pick = q[0]
                else:
                    continue  # this tenant has nothing that fits; others may
            q.remove(pick)
            self._remove(pick)
            batch.append(pick)
            tokens += pick.n_tokens
            if q:
                active.append(tenant)
            else:
                del self._queues[tenant]
            if tokens >= pol.max_tokens:
                break
        batch.sort(key=lambda p: p.n_tokens)
        return batch, expired

    def upcoming_tenants(self, limit: int = 256) -> list[str]:
        """Tenants likely in the next batches, most urgent first (for adapter prefetch)."""
        order = sorted(self._queues, key=lambda t: self._queues[t][0].urgency_ms)
        return order[:limit]

    def remove(self, pred) -> list[Pending]:
        """Take out every queued request matching ``pred`` (a partition handed to another worker)."""
        out = []
        for tenant in list(self._queues):
            q = self._queues[tenant]
            keep = deque(p for p in q if not pred(p))
            out += [p for p in q if pred(p)]
            if keep:
                self._queues[tenant] = keep
            else:
                del self._queues[tenant]
        for p in out:
            self._remove(p)
        return out

    def drain(self) -> list[Pending]:
        """Everything still queued (shutdown)."""
        out = [p for q in self._queues.values() for p in q]
        self._queues.clear()
        for p in out:
            self._remove(p)
        return out
