"""Create Flock's topics (idempotent) and describe them, over the Kafka admin API."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schema import topics
from workers.kafka_conn import kafka_options


def topic_plan(request_partitions: int | None = None) -> dict[str, tuple[int, dict[str, str]]]:
    plan = dict(topics.TOPICS)
    if request_partitions:
        plan[topics.REQUESTS_TOPIC] = (request_partitions, plan[topics.REQUESTS_TOPIC][1])
    return plan


async def ensure_topics(bootstrap: str, plan: dict[str, tuple[int, dict[str, str]]] | None = None,
                        timeout_s: float = 30.0, kafka: dict | None = None) -> dict[str, int]:
    """Create missing topics; return topic -> partition count as the broker has it. ``kafka``:
    connection options other than the configured ones (workers.kafka_conn)."""
    plan = plan or topic_plan()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(kafka_options() if kafka is None else kafka),
                                request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, n, 1, topic_configs=cfg) for name, (n, cfg) in plan.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
        return await describe_partitions(admin, list(plan))
    finally:
        await admin.close()


async def describe_partitions(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # Metadata for a just-created topic can lag by a moment; wait until every topic shows up.
    for _ in range(50):
        desc = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in desc if not d.get("error_code")}
        if all(counts.get(n) for n in names):
            return counts
        await asyncio.sleep(0.2)
    return counts
