"""Kafka topic names, partition counts and the tenant -> partition rule, in one place.

Producers in any language must key requests by tenant id and use Kafka's murmur2 partitioner
(the Java client's default; librdkafka: ``partitioner=murmur2_random``) so that a tenant's
requests land on one partition and the worker owning it keeps that tenant's adapter resident.
"""

from __future__ import annotations

REQUESTS_TOPIC = "flock.requests"
REPLIES_TOPIC = "flock.replies"
DLQ_TOPIC = "flock.dlq"
ROUTING_TOPIC = "flock.routing"  # compacted: tenant -> partitions for spread hot tenants
# With FLOCK_TENANT_REPLY_TOPICS each tenant reads its replies from <prefix><tenant_id> only.
TENANT_REPLY_PREFIX = "flock.replies."
TRAIN_TOPIC = "flock.train"  # training jobs (schema/train.py), key = tenant id
TRAIN_REPLIES_TOPIC = "flock.train.replies"  # job outcomes when a job names no reply_to

REQUEST_PARTITIONS = 12
REPLY_PARTITIONS = 12
DLQ_PARTITIONS = 3
TRAIN_PARTITIONS = 3

# One consumer group stores every worker's offsets (workers assign partitions manually).
CONSUMER_GROUP = "flock-workers"
# Trainers share the train topic's partitions through Kafka's group protocol (a job is long).
TRAINER_GROUP = "flock-trainers"

# topic -> (partitions, extra topic configs)
TOPICS: dict[str, tuple[int, dict[str, str]]] = {
    REQUESTS_TOPIC: (REQUEST_PARTITIONS, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    REPLIES_TOPIC: (REPLY_PARTITIONS, {"retention.ms": str(24 * 3600 * 1000)}),
    DLQ_TOPIC: (DLQ_PARTITIONS, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ROUTING_TOPIC: (1, {"cleanup.policy": "compact"}),
    TRAIN_TOPIC: (TRAIN_PARTITIONS, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    TRAIN_REPLIES_TOPIC: (TRAIN_PARTITIONS, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
}


def tenant_reply_topic(tenant_id: str, prefix: str = TENANT_REPLY_PREFIX) -> str:
    """The one reply topic a tenant owns (and may read) when replies are per tenant."""
    return f"{prefix}{tenant_id}"


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (the Java client's ``Utils.murmur2``), as a signed 32-bit int."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(tenant_id: str, partitions: int = REQUEST_PARTITIONS) -> int:
    """The partition Kafka's default partitioner picks for key = tenant id."""
    return (murmur2(tenant_id.encode("utf-8")) & 0x7FFFFFFF) % partitions
