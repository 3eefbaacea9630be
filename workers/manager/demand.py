"""Demand per partition, measured by the manager from the request topic's end offsets.

Workers can only report what they serve: a saturated or back-pressured worker (paused
partitions stop updating its high-water marks) under-reports demand, and a partition that just
changed owner has no history. End offsets grow with what producers send, whoever consumes."""

from __future__ import annotations

import time
from collections import deque

from aiokafka import AIOKafkaConsumer, TopicPartition

from workers.kafka_conn import kafka_options


class DemandMeter:
    def __init__(self, bootstrap: str, topic: str, partitions: int, window_s: float):
        self.bootstrap, self.topic, self.partitions, self.window_s = bootstrap, topic, partitions, window_s
        self._consumer: AIOKafkaConsumer | None = None
        self._samples: deque[tuple[float, dict[int, int]]] = deque()

    async def sample(self) -> None:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **kafka_options(), enable_auto_commit=False,
                                              request_timeout_ms=5000)
            await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        ends = await self._consumer.end_offsets(tps)
        now = time.monotonic()
        self._samples.append((now, {tp.partition: off for tp, off in ends.items()}))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rates(self) -> dict[int, float]:
        """Requests/s arriving per partition over the window (empty until two samples exist)."""
        if len(self._samples) < 2:
            return {}
        (t0, a), (t1, b) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return {}
        return {p: max(0, b[p] - a.get(p, b[p])) / (t1 - t0) for p in b}

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
