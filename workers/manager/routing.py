"""Hot tenants: one tenant's load above a partition's fair share cannot be balanced by moving
partitions, so it is spread over several partitions (and thus workers).

The plan is a pure function; the manager publishes it to ``tenant_routes`` (Postgres, for the
CLI) and to the compacted topic ``flock.routing`` (key = tenant, value = JSON, tombstone = back
to key hashing), which the client SDK follows."""

from __future__ import annotations

import json
import math
from typing import Callable

from aiokafka import AIOKafkaProducer

from workers.kafka_conn import kafka_options


def plan_routes(tenant_cost: dict[str, float], partition_cost: dict[int, float], partitions: int,
                home: Callable[[str], int], current: dict[str, list[int]], factor: float = 1.5,
                keep_factor: float = 0.5, frozen: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """tenant -> partitions for tenants worth spreading; others are absent (key hashing).

    A tenant is spread when its cost exceeds ``factor`` x one partition's fair share (total /
    partitions), over ceil(cost / fair share) partitions: its home partition plus the least
    loaded others. Hysteresis: an existing route stays until the tenant falls below
    ``keep_factor`` x fair share, and keeps its partitions while the width needed stays within
    a quarter (at least one) of the current width. Routes in ``frozen`` (changed too recently:
    their effect is not measured yet) stay exactly as they are."""
    total = sum(partition_cost.values())
    if total <= 0 or partitions < 2:
        return {t: p for t, p in current.items() if t in tenant_cost}  # no data: change nothing
    fair = total / partitions
    routes: dict[str, list[int]] = {t: p for t, p in current.items() if t in frozen}
    for tenant, cost in sorted(tenant_cost.items(), key=lambda kv: -kv[1]):
        if tenant in frozen:
            continue
        spread = tenant in current
        if cost <= (keep_factor if spread else factor) * fair:
            continue
        width = max(2, min(partitions, math.ceil(cost / fair)))
        if spread and abs(len(current[tenant]) - width) <= max(1, len(current[tenant]) // 4):
            # Close enough: rates are noisy, and every route change moves adapters around.
            routes[tenant] = current[tenant]
            continue
        h = home(tenant)
        others = sorted((p for p in range(partitions) if p != h), key=lambda p: (partition_cost.get(p, 0.0), p))
        routes[tenant] = sorted([h, *others[: width - 1]])
    return routes


class RoutePublisher:
    """Writes route changes to Postgres and the compacted Kafka topic."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, conn, routes: dict[str, list[int]], current: dict[str, list[int]]) -> int:
        changed = {t: p for t, p in routes.items() if current.get(t) != p}
        removed = [t for t in current if t not in routes]
        if not changed and not removed:
            return 0
        async with conn.transaction():
            for t, parts in changed.items():
                await conn.execute("""
                    INSERT INTO tenant_routes (tenant_id, partitions, updated_at)
                    SELECT $1::varchar, $2::jsonb, now() WHERE EXISTS (SELECT 1 FROM tenants WHERE tenant_id = $1::varchar)
                    ON CONFLICT (tenant_id) DO UPDATE SET partitions = EXCLUDED.partitions, updated_at = now()""",
                                   t, parts)
            if removed:
                await conn.execute("DELETE FROM tenant_routes WHERE tenant_id = ANY($1::text[])", removed)
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **kafka_options(), acks="all", enable_idempotence=True)
            await self._producer.start()
        futs = [await self._producer.send(self.topic, json.dumps({"tenant_id": t, "partitions": p}).encode(),
                                          key=t.encode()) for t, p in changed.items()]
        futs += [await self._producer.send(self.topic, None, key=t.encode()) for t in removed]
        for f in futs:
            await f
        return len(changed) + len(removed)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def read_routes(conn) -> dict[str, list[int]]:
    return {r["tenant_id"]: list(r["partitions"]) for r in await conn.fetch("SELECT tenant_id, partitions FROM tenant_routes")}


async def recent_routes(conn, younger_than_s: float) -> frozenset[str]:
    return frozenset(r["tenant_id"] for r in await conn.fetch(
        "SELECT tenant_id FROM tenant_routes WHERE updated_at > now() - make_interval(secs => $1)", younger_than_s))
