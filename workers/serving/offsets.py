"""Per-partition offset bookkeeping for at-least-once delivery.

An offset becomes committable only when it and every offset below it (that this worker
consumed) has its reply or DLQ record acknowledged by Kafka. Commit value = next offset to read.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    outstanding: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # min-heap over outstanding (lazy deletion)
    highest_seen: int = -1
    committed: int | None = None  # last value handed to Kafka

    def committable(self) -> int | None:
        while self.heap and self.heap[0] not in self.outstanding:
            heapq.heappop(self.heap)
        if self.heap:
            return self.heap[0]  # everything below the smallest outstanding offset is done
        return self.highest_seen + 1 if self.highest_seen >= 0 else None


class OffsetTracker:
    """Which offsets of which partitions are still waiting for their reply to be acked."""

    def __init__(self) -> None:
        self._parts: dict[int, PartitionOffsets] = {}

    def track(self, partition: int, offset: int) -> None:
        p = self._parts.setdefault(partition, PartitionOffsets())
        if offset in p.outstanding or offset <= p.highest_seen and p.committed is not None and offset < p.committed:
            return  # redelivery of something already done
        p.outstanding.add(offset)
        heapq.heappush(p.heap, offset)
        p.highest_seen = max(p.highest_seen, offset)

    def done(self, partition: int, offset: int) -> None:
        p = self._parts.get(partition)
        if p is not None:
            p.outstanding.discard(offset)

    def pending(self, partition: int | None = None) -> int:
        if partition is not None:
            p = self._parts.get(partition)
            return len(p.outstanding) if p else 0
        return sum(len(p.outstanding) for p in self._parts.values())

    def to_commit(self) -> dict[int, int]:
        """Partitions whose committable offset moved since the last commit."""
        out = {}
        for part, p in self._parts.items():
            c = p.committable()
            if c is not None and c != p.committed:
                out[part] = c
        return out

    def mark_committed(self, offsets: dict[int, int]) -> None:
        for part, off in offsets.items():
            p = self._parts.get(part)
            if p is not None:  # forgotten while the commit was in flight (handed over or dropped)
                p.committed = off

    def forget(self, partition: int) -> None:
        """Drop a partition this worker no longer owns."""
        self._parts.pop(partition, None)

    def partitions(self) -> list[int]:
        return sorted(self._parts)
