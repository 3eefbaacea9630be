"""Against the real broker: topics with N partitions; keyed wire messages land tenant-stable
partitions, the one schema.topics.partition_for predicts; headers survive."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, strategies as st

from schema.messages import Headers, InferRequest, header_map
from schema.topics import murmur2, partition_for
from workers.kafka_admin import ensure_topics
from workers.kafka_conn import kafka_options


@given(st.binary(max_size=64))
def test_murmur2_equals_kafka_clients(data):
    # aiokafka's murmur2 is the Java client's (returned unsigned); ours is Java's signed int.
    h = murmur2(data)
    assert -2**31 <= h < 2**31 and h & 0xFFFFFFFF == aiokafka_murmur2(data)


async def test_topics_created_with_partitions_idempotently(kafka_bootstrap, unique):
    plan = {f"t.{unique}.a": (7, {}), f"t.{unique}.b": (1, {"cleanup.policy": "compact"})}
    assert await ensure_topics(kafka_bootstrap, plan) == {f"t.{unique}.a": 7, f"t.{unique}.b": 1}
    assert await ensure_topics(kafka_bootstrap, plan) == {f"t.{unique}.a": 7, f"t.{unique}.b": 1}


async def test_keyed_requests_land_on_tenant_stable_partitions(kafka_bootstrap, unique):
    topic, parts = f"req.{unique}", 6
    await ensure_topics(kafka_bootstrap, {topic: (parts, {})})
    tenants = [f"tenant-{i}" for i in range(20)]
    sent: dict[str, InferRequest] = {}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, **kafka_options(), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for round_ in range(3):
            for t in tenants:
                req = InferRequest(tenant_id=t, text=f"round {round_} for {t}")
                sent[req.request_id] = req
                md = await producer.send_and_wait(topic, req.encode(), key=t.encode(), headers=req.headers())
                assert md.partition == partition_for(t, parts)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, **kafka_options(), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[str, set[int]] = defaultdict(set)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(parts)])
        got = 0
        async with asyncio.timeout(30):
            while got < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, records in batch.items():
                    for rec in records:
                        req = InferRequest.decode(rec.value)
                        assert req == sent[req.request_id]
                        h = header_map(rec.headers)
                        assert h[Headers.TENANT_ID] == req.tenant_id == rec.key.decode()
                        assert h[Headers.REQUEST_ID] == req.request_id
                        seen[req.tenant_id].add(tp.partition)
                        got += 1
    finally:
        await consumer.stop()
    assert all(len(p) == 1 for p in seen.values()), "a tenant's requests spread over partitions"
    assert len({next(iter(p)) for p in seen.values()}) > 1, "all tenants on one partition"
