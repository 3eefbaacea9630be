"""Which request partitions a worker (or an edge process of one) may fetch and commit.

Ownership is static (``partitions`` from config, all owned for good, epoch 0) or follows the
manager's leases (``follow_leases``): every partition is assigned to the consumer but paused
unless its lease is held. The control-plane agent hands in its current view (``set_leases``);
the intake loop applies it (``apply``) between fetches. Fencing: a partition whose lease was not
renewed in time on the local monotonic clock is dropped at once, and ``fenced`` keeps commits to
partitions still owned under a valid lease.

Three reasons a partition is not fetched, each with its own name:
- ``backpressured``: too many unreplied requests of it are held (high/low water marks);
- ``releasing``: a hand-over to another worker is under way;
- not in ``owned``: no lease (or never assigned).
``halted`` is the consumer-side state: the partitions currently paused at the Kafka consumer,
whatever the reason; ``sync`` makes it match the reasons above.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger("flock.worker")


class PartitionOwnership:
    def __init__(self, topic: str, partitions: list[int], follow_leases: bool,
                 forget: Callable[[int], None] = lambda p: None):
        self.topic = topic
        self.partitions = list(partitions)
        self.follow_leases = follow_leases
        self.forget = forget  # drop a partition's offset bookkeeping (the tracker's)
        self.owned: dict[int, int] = {} if follow_leases else {p: 0 for p in self.partitions}  # -> lease epoch
        self.lease_until: dict[int, float] = {}  # partition -> lease valid until (time.monotonic())
        self.releasing: set[int] = set()
        self.backpressured: set[int] = set()
        self.halted: set[int] = set()
        self._wanted: dict[int, tuple[int, float]] | None = None  # newest lease view, not yet applied
        self.consumer: AIOKafkaConsumer | None = None

    def _tp(self, p: int) -> TopicPartition:
        return TopicPartition(self.topic, p)

    # ------------------------------------------------------------ fetching
    def fetchable(self, p: int) -> bool:
        """Records of p may be accepted (owned, not being handed over)."""
        return p in self.owned and p not in self.releasing

    def sync(self) -> None:
        """Pause at the consumer whatever is not owned, being handed over, or back-pressured."""
        for p in self.partitions:
            fetch = self.fetchable(p) and p not in self.backpressured
            if fetch and p in self.halted:
                self.consumer.resume(self._tp(p))
                self.halted.discard(p)
            elif not fetch and p not in self.halted:
                self.consumer.pause(self._tp(p))
                self.halted.add(p)

    def backpressure(self, pending: Callable[[int], int], high: int, low: int) -> None:
        for p in self.partitions:
            n = pending(p)
            if p not in self.backpressured and n >= high:
                self.backpressured.add(p)
            elif p in self.backpressured and n <= low:
                self.backpressured.discard(p)
        self.sync()

    # ------------------------------------------------------------ leases
    def set_leases(self, leases: dict[int, tuple[int, float]]) -> None:
        """The agent's current view: partition -> (epoch, valid until on time.monotonic())."""
        self._wanted = dict(leases)

    async def apply(self) -> None:
        """Apply the newest lease view and expire lapsed leases (fencing)."""
        wanted, self._wanted = self._wanted, None
        if wanted is not None:
            for p in list(self.owned):
                if p not in self.releasing and (p not in wanted or wanted[p][0] != self.owned[p]):
                    self.drop(p, "lease moved to another worker")
            for p, (epoch, until) in wanted.items():
                if p in self.releasing:
                    continue
                self.lease_until[p] = until
                if p not in self.owned:
                    await self.acquire(p, epoch)
        now = time.monotonic()
        for p in list(self.owned):
            if self.lease_until.get(p, 0.0) < now:
                self.drop(p, "lease not renewed in time")
        self.sync()

    async def acquire(self, p: int, epoch: int) -> None:
        """Start a partition at the offset its previous owner committed."""
        tp = self._tp(p)
        try:
            committed = await self.consumer.committed(tp)
        except KafkaError as exc:
            log.warning("cannot read committed offset of partition %d (will retry): %s", p, exc)
            self.lease_until.pop(p, None)
            return
        if committed is None:
            await self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, committed)
        self.forget(p)
        self.owned[p] = epoch
        log.info("partition %d acquired at epoch %d from offset %s", p, epoch, committed)

    def drop(self, p: int, why: str) -> None:
        """Fence: stop fetching and committing p now; replies still in flight may duplicate."""
        self.let_go(p)
        self.sync()
        log.warning("partition %d dropped: %s", p, why)

    def let_go(self, p: int) -> None:
        """No longer ours: forget the lease and the offsets (end of a hand-over, or a drop)."""
        self.owned.pop(p, None)
        self.lease_until.pop(p, None)
        self.forget(p)

    def fenced(self, offsets: dict[int, int]) -> dict[int, int]:
        """The offsets this worker may still commit: in lease mode only partitions owned under a
        lease that is valid now."""
        if not self.follow_leases:
            return offsets
        now = time.monotonic()
        return {p: o for p, o in offsets.items() if p in self.owned and self.lease_until.get(p, 0.0) > now}

    # ------------------------------------------------------------ hand-over (source side)
    def begin_release(self, p: int) -> None:
        self.releasing.add(p)
        self.sync()

    def end_release(self, p: int) -> None:
        self.releasing.discard(p)
        self.sync()
