"""Client SDK: request/reply over Kafka with correlation ids.

    async with FlockClient() as client:
        reply = await client.infer("acme", "the text", timeout=10)
        reply.outputs["label"]

Requests are keyed by tenant (tenant-stable partitions). Replies are read from the client's
reply topic (default: the shared ``flock.replies``; pass your own for high volume) and matched
by request_id; a duplicate reply (at-least-once redelivery) is counted and dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schema.messages import InferReply, InferRequest, WireError, now_ms
from workers.config import settings


class FlockTimeout(TimeoutError):
    """No reply within the timeout (the request may still be answered later)."""


class FlockClient:
    def __init__(self, bootstrap: str | None = None, *, requests_topic: str | None = None,
                 reply_topic: str | None = None):
        s = settings()
        self.bootstrap = bootstrap or s.kafka_bootstrap
        self.requests_topic = requests_topic or s.requests_topic
        self.reply_topic = reply_topic or s.replies_topic
        self._pending: dict[str, asyncio.Future[InferReply]] = {}
        self.duplicates = 0
        self.stray = 0  # replies for requests of other clients or earlier runs
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "FlockClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True,
                                          acks="all", linger_ms=2)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="latest")
        await self._consumer.start()
        parts = await self._consumer_partitions()
        tps = [TopicPartition(self.reply_topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so no reply sent after start() is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies())

    async def _consumer_partitions(self) -> list[int]:
        for _ in range(50):
            parts = self._consumer.partitions_for_topic(self.reply_topic)
            if parts:
                return sorted(parts)
            await self._consumer._client.force_metadata_update()  # noqa: SLF001 - no public way to wait
            await asyncio.sleep(0.1)
        raise RuntimeError(f"reply topic {self.reply_topic!r} does not exist (flockserve topics create)")

    async def close(self) -> None:
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
        ack = await self._producer.send(self.requests_topic, req.encode(), key=req.tenant_id.encode(),
                                        headers=req.headers())

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
