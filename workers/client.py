"""Client SDK: request/reply over Kafka with correlation ids.

    async with FlockClient() as client:
        reply = await client.infer("acme", "the text", timeout=10)
        reply.outputs["label"]

Requests are keyed by tenant (tenant-stable partitions). With a tenant key (``tenant_key=`` or
FLOCK_TENANT_KEY, from ``flockserve tenant key create``) every request is signed (workers/auth.py);
with per-tenant replies (FLOCK_TENANT_REPLY_TOPICS) a client made for one tenant (``tenant=``)
reads that tenant's own reply topic, the only one its Kafka principal may read. A hot tenant the manager spread over
several partitions is routed by the compacted ``flock.routing`` topic (see
:class:`RoutingTable`): a partition drawn from its list, key hashing otherwise. Replies are read from the client's
reply topic (default: the shared ``flock.replies``; pass your own for high volume) and matched
by request_id; a duplicate reply (at-least-once redelivery) is counted and dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schema.messages import Headers, InferReply, InferRequest, WireError, now_ms
from schema.topics import tenant_reply_topic
from workers.auth import decode_key, sign
from workers.config import settings
from workers.kafka_conn import kafka_options


log = logging.getLogger("flock.client")


class FlockTimeout(TimeoutError):
    """No reply within the timeout (the request may still be answered later)."""


class RoutingTable:
    """tenant -> partitions, followed from the compacted routing topic (key = tenant, JSON value,
    tombstone = back to hashing). A missing topic or a stale table only means hashing."""

    def __init__(self, bootstrap: str, topic: str, kafka: dict[str, Any] | None = None):
        self.bootstrap, self.topic = bootstrap, topic
        self.kafka = kafka_options() if kafka is None else kafka
        self.routes: dict[str, list[int]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self._rng = random.Random()

    async def start(self, wait_s: float = 5.0) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **self.kafka, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            await self._consumer._client.force_metadata_update()  # noqa: SLF001 - no public way to wait
            parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            log.info("routing topic %s absent: tenants are routed by key hashing", self.topic)
            return
        tps = [TopicPartition(self.topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:  # read the table up to now before the first request
            self._apply(await self._consumer.getmany(timeout_ms=100))
            positions = [await self._consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                break
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            self._apply(await self._consumer.getmany(timeout_ms=500))

    def _apply(self, batch) -> None:
        for recs in batch.values():
            for rec in recs:
                tenant = rec.key.decode() if rec.key else None
                if tenant is None:
                    continue
                if rec.value is None:
                    self.routes.pop(tenant, None)
                    continue
                try:
                    parts = [int(p) for p in json.loads(rec.value)["partitions"]]
                except (ValueError, KeyError, TypeError):
                    continue
                if parts:
                    self.routes[tenant] = parts

    def partition(self, tenant_id: str, partition_count: int | None = None) -> int | None:
        """A partition for this tenant's next request, or None for key hashing."""
        parts = self.routes.get(tenant_id)
        if not parts:
            return None
        if partition_count is not None:
            parts = [p for p in parts if p < partition_count]
        return self._rng.choice(parts) if parts else None

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()


class FlockClient:
    def __init__(self, bootstrap: str | None = None, *, requests_topic: str | None = None,
                 reply_topic: str | None = None, routing_topic: str | None = None, routing: bool = True,
                 tenant: str | None = None, tenant_key: str | None = None,
                 kafka: dict[str, Any] | None = None):
        s = settings()
        self.bootstrap = bootstrap or s.kafka_bootstrap
        self.requests_topic = requests_topic or s.requests_topic
        if reply_topic is None and tenant is not None and s.tenant_reply_topics:
            reply_topic = tenant_reply_topic(tenant, s.reply_topic_prefix)  # the workers reply only there
        self.reply_topic = reply_topic or s.replies_topic
        key = tenant_key or (s.tenant_key.get_secret_value() if s.tenant_key else None)
        self._key = decode_key(key) if key else None  # (key_id, secret): requests are signed
        self.kafka = kafka_options() if kafka is None else kafka  # e.g. the tenant's own principal
        self._pending: dict[str, asyncio.Future[InferReply]] = {}
        self.duplicates = 0
        self.stray = 0  # replies for requests of other clients or earlier runs
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None
        self.routing = RoutingTable(self.bootstrap, routing_topic or s.routing_topic, self.kafka) if routing else None
        self._request_partitions: int | None = None

    async def __aenter__(self) -> "FlockClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **self.kafka, enable_idempotence=True,
                                          acks="all", linger_ms=2)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **self.kafka, enable_auto_commit=False,
                                          auto_offset_reset="latest")
        await self._consumer.start()
        parts = await self._consumer_partitions()
        tps = [TopicPartition(self.reply_topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so no reply sent after start() is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies())
        if self.routing is not None:
            await self.routing.start()
            parts = await self._producer.partitions_for(self.requests_topic)
            self._request_partitions = len(parts) if parts else None

    async def _consumer_partitions(self) -> list[int]:
        for _ in range(50):
            parts = self._consumer.partitions_for_topic(self.reply_topic)
            if parts:
                return sorted(parts)
            await self._consumer._client.force_metadata_update()  # noqa: SLF001 - no public way to wait
            await asyncio.sleep(0.1)
        raise RuntimeError(f"reply topic {self.reply_topic!r} does not exist (flockserve topics create)")

    async def close(self) -> None:
        if self.routing is not None:
            await self.routing.close()
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for f in self._pending.values():
            if not f.done():
                f.cancel()
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    async def _read_replies(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    try:
                        reply = InferReply.decode(rec.value)
                    except WireError:
                        continue
                    fut = self._pending.pop(reply.request_id, None)
                    if fut is None:
                        self.stray += 1
                    elif fut.done():
                        self.duplicates += 1
                    else:
                        fut.set_result(reply)

    def request(self, tenant_id: str, text: str | None = None, *, text_pair: str | None = None,
                token_ids: list[int] | None = None, timeout: float | None = 30.0) -> InferRequest:
        return InferRequest(tenant_id=tenant_id, text=text, text_pair=text_pair, token_ids=token_ids,
                            deadline_ms=now_ms() + int(timeout * 1000) if timeout else None,
                            reply_to=self.reply_topic)

    async def submit(self, req: InferRequest) -> asyncio.Future[InferReply]:
        """Produce a request; the returned future resolves with its reply."""
        fut: asyncio.Future[InferReply] = asyncio.get_running_loop().create_future()
        self._pending[req.request_id] = fut
        partition = self.routing.partition(req.tenant_id, self._request_partitions) if self.routing else None
        value, headers = req.encode(), req.headers()
        if self._key is not None:
            headers.append((Headers.AUTH, sign(*self._key, value)))
        ack = await self._producer.send(self.requests_topic, value, key=req.tenant_id.encode(),
                                        headers=headers, partition=partition)

        def produced(a: asyncio.Future, rid: str = req.request_id) -> None:
            # Not acked by Kafka: the request may not exist, so fail its reply future.
            if (a.cancelled() or a.exception() is not None) and not fut.done():
                self._pending.pop(rid, None)
                fut.set_exception(a.exception() or asyncio.CancelledError())

        ack.add_done_callback(produced)  # acks are awaited in the background, not one by one
        return fut

    async def infer(self, tenant_id: str, text: str | None = None, *, text_pair: str | None = None,
                    token_ids: list[int] | None = None, timeout: float = 30.0) -> InferReply:
        req = self.request(tenant_id, text, text_pair=text_pair, token_ids=token_ids, timeout=timeout)
        start = time.monotonic()
        fut = await self.submit(req)
        try:
            return await asyncio.wait_for(fut, max(0.001, timeout - (time.monotonic() - start)))
        except asyncio.TimeoutError:
            self._pending.pop(req.request_id, None)
            raise FlockTimeout(f"no reply to {req.request_id} within {timeout}s") from None

    async def infer_many(self, items: Iterable[tuple[str, str]], *, timeout: float = 60.0,
                         concurrency: int = 256) -> list[InferReply | Exception]:
        """Batch helper for pipelines: (tenant, text) pairs -> replies in the same order."""
        sem = asyncio.Semaphore(concurrency)

        async def one(t: str, x: str) -> Any:
            async with sem:
                try:
                    return await self.infer(t, x, timeout=timeout)
                except FlockTimeout as exc:
                    return exc

        return await asyncio.gather(*(one(t, x) for t, x in items))
