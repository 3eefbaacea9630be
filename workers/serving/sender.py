"""Sending replies and DLQ records, and turning their acks into committable offsets.

Records go out in batches: the replies of one engine batch (or the errors of one intake round)
are grouped per (topic, partition) into aiokafka record batches (``create_batch``/``send_batch``),
with one future and one ack callback per batch. Partitions are chosen as ``producer.send`` would
(murmur2 of the key, the tenant id), so replies of a tenant stay in order on one partition.

A consumed record (``Work``) is done when every record it causes (its reply, and/or a DLQ
record) is acknowledged by Kafka; only then does its offset count as done in the tracker, so an
unacknowledged reply is never committed past and is replayed after a crash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from time import thread_time
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from schema.messages import InferReply, InferRequest
from workers.serving.fault_hooks import CrashPoints
from workers.serving.metrics import WorkerMetrics
from workers.serving.offsets import OffsetTracker
from workers.serving.replies import dlq_headers

log = logging.getLogger("flock.worker")

Send = tuple[str, bytes, "bytes | None", list]  # topic, value, key, headers


@dataclass(slots=True)
class Work:
    """A consumed record on its way to a reply."""

    partition: int
    offset: int
    received: float  # time.monotonic()
    request: InferRequest | None = None
    token_ids: list[int] | None = None
    token_type_ids: list[int] | None = None
    sends_left: int = 0
    status: str = ""


class ReplySender:
    def __init__(self, producer: AIOKafkaProducer, tracker: OffsetTracker, metrics: WorkerMetrics,
                 crash: CrashPoints, requests_topic: str, replies_topic: str, dlq_topic: str,
                 tenant_reply_prefix: str | None = None):
        self.producer = producer
        self.tracker = tracker
        self.metrics = metrics
        self.crash = crash
        self.requests_topic = requests_topic
        self.replies_topic = replies_topic
        self.dlq_topic = dlq_topic
        self.tenant_reply_prefix = tenant_reply_prefix
        self._topic_ok: dict[str, tuple[bool, float]] = {}
        self._partitioner = DefaultPartitioner()  # what producer.send() would pick: murmur2 of the key
        self._keyed: dict[tuple, int] = {}  # (topic, key, partition count) -> partition
        self._latency: dict[str, Any] = {}  # tenant -> histogram child (labels() is not free)

    def topic_for(self, tenant_id: str, reply_to: str | None) -> str:
        """Where a tenant's reply goes. Per-tenant replies: always the tenant's own topic, which
        only its principal may read; a reply_to naming any other topic is not honoured."""
        prefix = self.tenant_reply_prefix
        if prefix is None:
            return reply_to or self.replies_topic
        own = prefix + tenant_id
        if reply_to is not None and reply_to != own:
            self.metrics.reply_to_refused.inc()
        return own

    async def reply_topic_ok(self, topic: str) -> bool:
        """Does the reply topic exist? Cached; a missing topic is asked about again after 30 s."""
        cached = self._topic_ok.get(topic)
        if cached and (cached[0] or time.monotonic() - cached[1] < 30):
            return cached[0]
        try:
            parts = await asyncio.wait_for(self.producer.partitions_for(topic), 3)
            ok = bool(parts)
        except (asyncio.TimeoutError, KafkaError):
            ok = False
        self._topic_ok[topic] = (ok, time.monotonic())
        return ok

    async def send_replies(self, items: list[tuple[Work, InferReply, bytes, list]]) -> None:
        """Replies (with their encoded value and headers) of many requests, sent as record batches."""
        records: list[tuple[Work, list[Send]]] = []
        for w, reply, value, headers in items:
            topic = self.topic_for(w.request.tenant_id, w.request.reply_to)
            if topic == self.replies_topic or await self.reply_topic_ok(topic):
                records.append((w, [(topic, value, reply.tenant_id.encode(), headers)]))
            else:
                # The reply cannot be delivered where asked: keep it in the DLQ rather than stall.
                source = f"{self.requests_topic}/{w.partition}/{w.offset}"
                self.metrics.dlq.labels("reply_topic_missing").inc()
                records.append((w, [(self.dlq_topic, value, reply.tenant_id.encode(),
                                     dlq_headers(headers, f"reply topic {topic!r} does not exist", source))]))
        await self.send_records(records)

    async def send_records(self, items: list[tuple[Work, list[Send]]]) -> None:
        """Every record of every item, grouped per (topic, partition) into as few produce batches
        as fit ``max_batch_size``; one future and one callback per batch, not per record."""
        if not items:
            return
        st = self.metrics.stage_cpu
        t0, c0 = thread_time(), st.charged
        groups: dict[tuple[str, int], list[tuple[Work, bytes | None, bytes, list]]] = {}
        parts: dict[str, tuple[list[int], list[int]]] = {}
        for w, sends in items:
            w.sends_left = len(sends)
            for topic, value, key, headers in sends:
                if topic not in parts:
                    if topic not in (self.replies_topic, self.dlq_topic) or topic not in self._topic_ok:
                        await self.reply_topic_ok(topic)  # metadata for the partitioner
                    cluster = self.producer.client.cluster
                    parts[topic] = (sorted(cluster.partitions_for_topic(topic) or ()),
                                    sorted(cluster.available_partitions_for_topic(topic) or ()))
                all_p, avail = parts[topic]
                if key is not None and all_p:
                    # Keyed: murmur2(key) over all partitions (aiokafka's is pure Python, ~5 µs):
                    # the same few tenant ids again and again, so remember the answer.
                    ck = (topic, key, len(all_p))
                    part = self._keyed.get(ck)
                    if part is None:
                        if len(self._keyed) > 100_000:
                            self._keyed.clear()
                        part = self._keyed[ck] = self._partitioner(key, all_p, avail)
                else:
                    part = self._partitioner(key, all_p, avail) if all_p else 0
                groups.setdefault((topic, part), []).append((w, key, value, headers))
        for (topic, part), recs in groups.items():
            builder, members = self.producer.create_batch(), []
            for w, key, value, headers in recs:
                if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    await self._submit(builder, topic, part, members)
                    builder, members = self.producer.create_batch(), []
                    builder.append(timestamp=None, key=key, value=value, headers=headers)  # first always fits
                members.append(w)
            await self._submit(builder, topic, part, members)
        st.add_around_await("produce", t0, c0)

    async def _submit(self, builder: Any, topic: str, part: int, members: list[Work]) -> None:
        if not members:
            return
        try:
            fut = await self.producer.send_batch(builder, topic, partition=part)
        except KafkaError as exc:
            # Not queued: the offsets stay outstanding, never committed, and are replayed.
            log.error("produce of %d records to %s/%d failed: %s", len(members), topic, part, exc)
            return
        fut.add_done_callback(functools.partial(self._acked, members))
        self.metrics.produce_batches.inc()
        self.metrics.produce_records.inc(len(members))

    def _acked(self, members: list[Work], fut: asyncio.Future) -> None:
        t0 = thread_time()
        try:
            if fut.cancelled() or fut.exception() is not None:
                # Not acked: the offsets stay outstanding, so they are never committed and are replayed.
                log.error("send of %d records (first %s/%d) failed: %s", len(members), self.requests_topic,
                          members[0].offset, "cancelled" if fut.cancelled() else fut.exception())
                return
            self.crash.on_acked(len(members))
            now = time.monotonic()
            statuses: dict[str, int] = {}
            latency = self._latency
            for w in members:
                w.sends_left -= 1
                if w.sends_left == 0:
                    self.tracker.done(w.partition, w.offset)
                    tenant = w.request.tenant_id if w.request else "_undecodable"
                    child = latency.get(tenant)
                    if child is None:
                        child = latency[tenant] = self.metrics.latency.labels(tenant)
                    child.observe(now - w.received)
                    status = w.status or "ok"
                    statuses[status] = statuses.get(status, 0) + 1
            for status, n in statuses.items():
                self.metrics.replies.labels(status).inc(n)
        finally:
            self.metrics.stage_cpu.add("produce", t0)
