"""Load during a fault: an open-loop producer and a reply/DLQ collector, both recording History."""

from __future__ import annotations

import asyncio
import random
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schema.messages import Headers, InferReply, InferRequest, WireError, header_map, now_ms
from scripts.faults.history import History, Sent
from workers.auth import sign
from workers.loadgen import make_text, tenant_sampler
from workers.kafka_conn import kafka_options


class Collector:
    """Reads a reply topic and a DLQ topic from the start into the history until stopped."""

    def __init__(self, bootstrap: str, replies: str, dlq: str, history: History):
        self.bootstrap, self.replies, self.dlq, self.h = bootstrap, replies, dlq, history
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:  # survive broker restarts: reconnect and re-read from the last position
            c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **kafka_options(), enable_auto_commit=False,
                                 auto_offset_reset="earliest", request_timeout_ms=10000)
            positions: dict[TopicPartition, int] = getattr(self, "_positions", {})
            self._positions = positions
            try:
                await c.start()
                tps = []
                for topic in (self.replies, self.dlq):
                    parts = None
                    while not parts:
                        await c._client.force_metadata_update()  # noqa: SLF001
                        parts = c.partitions_for_topic(topic)
                    tps += [TopicPartition(topic, p) for p in parts]
                c.assign(tps)
                for tp in tps:
                    if tp in positions:
                        c.seek(tp, positions[tp])
                while True:
                    batch = await c.getmany(timeout_ms=200)
                    now = time.monotonic()
                    for tp, recs in batch.items():
                        for r in recs:
                            positions[tp] = r.offset + 1
                            if tp.topic == self.replies:
                                try:
                                    rep = InferReply.decode(r.value)
                                except WireError:
                                    continue
                                self.h.replies.append((rep.request_id, rep.status.value, now))
                            else:
                                self.h.dlq.append((header_map(r.headers).get(Headers.REQUEST_ID), now))
            except asyncio.CancelledError:
                await c.stop()
                raise
            except Exception:  # noqa: BLE001 - broker away; try again
                await asyncio.sleep(1)
                try:
                    await c.stop()
                except Exception:  # noqa: BLE001
                    pass

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def drive(bootstrap: str, topic: str, history: History, tenants: list[str], *, rate: float,
                seconds: float, timeout_s: float = 120.0, seed: int = 0, reply_to: str | None = None,
                extra: "callable | None" = None, keys: dict[str, tuple[str, bytes]] | None = None) -> None:
    """Produce requests at ``rate`` for ``seconds``; ``extra(i)`` returns poison records to interleave;
    with ``keys`` (tenant -> (key_id, secret)) every request is signed with its tenant's key."""
    rng = random.Random(seed)
    pick = tenant_sampler(tenants, "zipf", 1.0, rng)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=2,
                         request_timeout_ms=60000)
    await p.start()
    acks = []
    try:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for raw in (extra(i) if extra else ()):
                acks.append(asyncio.ensure_future(_send_raw(p, topic, raw, history)))
            req = InferRequest(tenant_id=pick(), text=make_text(rng, 4, 40),
                               deadline_ms=now_ms() + int(timeout_s * 1000), reply_to=reply_to)
            s = history.sent[req.request_id] = Sent(req.tenant_id, time.monotonic(), timeout_s)
            acks.append(asyncio.ensure_future(_send(p, topic, req, s, keys[req.tenant_id] if keys else None)))
            i += 1
        await asyncio.gather(*acks, return_exceptions=True)
    finally:
        await p.stop()


async def _send(p: AIOKafkaProducer, topic: str, req: InferRequest, s: Sent,
                key: tuple[str, bytes] | None = None) -> None:
    value, headers = req.encode(), req.headers()
    if key is not None:
        headers.append((Headers.AUTH, sign(*key, value)))
    try:
        fut = await p.send(topic, value, key=req.tenant_id.encode(), headers=headers)
        await fut
        s.acked = True
    except Exception:  # noqa: BLE001 - not acked: not owed a reply
        pass


async def _send_raw(p: AIOKafkaProducer, topic: str, raw: tuple, history: History) -> None:
    """Poison record: (bytes, request_id if a reply is owed, key, whether a DLQ record is owed)."""
    value, rid, key, dlq = raw
    try:
        fut = await p.send(topic, value, key=(key or "poison").encode())
        await fut
        if rid is not None:
            history.sent[rid] = Sent(key or "poison", time.monotonic(), None, acked=True)
        if dlq:
            history.poison_to_dlq += 1
    except Exception:  # noqa: BLE001
        pass


def forgeries(tenants: list[str], keys: dict[str, tuple[str, bytes]], n: int = 200,
              seed: int = 1) -> list[tuple[bytes, bytes, list, str]]:
    """Requests in the tenants' names with their real key ids but a wrong secret, so that each
    costs a worker the full MAC check: (value, key, headers, request_id)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = tenants[i % len(tenants)]
        req = InferRequest(tenant_id=t, text=make_text(rng, 4, 40))
        value = req.encode()
        out.append((value, t.encode(), req.headers() + [(Headers.AUTH, sign(keys[t][0], bytes(32), value))],
                    req.request_id))
    return out


async def flood_forged(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list, str]], *,
                       rate: float, seconds: float) -> int:
    """Produce ``records`` round and round at ``rate`` for ``seconds``; how many Kafka acked."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), linger_ms=5, acks=1)
    await p.start()
    futs = []
    try:
        start, i = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            value, key, headers, _ = records[i % len(records)]
            futs.append(await p.send(topic, value, key=key, headers=headers))
            i += 1
        done = await asyncio.gather(*futs, return_exceptions=True)
        return sum(1 for d in done if not isinstance(d, BaseException))
    finally:
        await p.stop()


async def wait_answered(history: History, timeout: float) -> None:
    """Until every acked request has a reply or DLQ record (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if history.check()["lost"] == 0:
            return
        await asyncio.sleep(0.5)
