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
from sqlalchemy import bindparam, delete, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB, insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schema.tables import Tenant, TenantRoute
from schema.topics import ROUTING_TOPIC, TOPICS
from workers.kafka_conn import kafka_options
from workers.manager.pg import secs


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


R, T = TenantRoute.__table__, Tenant.__table__

# One statement, so one transaction: routes of removed tenants go, changed ones are upserted
# (skipping tenants deleted meanwhile). p_routes: {tenant: [partitions]}.
_new = func.jsonb_each(bindparam("p_routes", type_=JSONB)).table_valued("key", "value")
_upsert = pg_insert(R).from_select(
    ["tenant_id", "partitions", "updated_at"],
    select(_new.c.key, _new.c.value, func.now()).where(exists().where(T.c.tenant_id == _new.c.key)))
WRITE_ROUTES = _upsert.on_conflict_do_update(
    index_elements=[R.c.tenant_id], set_={"partitions": _upsert.excluded.partitions, "updated_at": func.now()},
).add_cte(delete(R).where(R.c.tenant_id.in_(bindparam("p_removed", expanding=True))).cte("removed"))

READ_ROUTES = select(R.c.tenant_id, R.c.partitions)
RECENT_ROUTES = select(R.c.tenant_id).where(R.c.updated_at > func.now() - secs("p_age"))


ROUTING_TOPIC_SHAPE = TOPICS[ROUTING_TOPIC]  # (partitions, configs), whatever the topic is named


class RoutePublisher:
    """Writes route changes to Postgres and the compacted Kafka topic."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, conn: AsyncConnection, routes: dict[str, list[int]], current: dict[str, list[int]]) -> int:
        changed = {t: p for t, p in routes.items() if current.get(t) != p}
        removed = [t for t in current if t not in routes]
        if not changed and not removed:
            return 0
        await conn.execute(WRITE_ROUTES, {"p_routes": changed, "p_removed": removed})
        if self._producer is None:
            # Create the compacted topic if missing: a send to an absent topic blocks the tick on
            # metadata (up to the request timeout) and with it every lease decision.
            from workers.kafka_admin import ensure_topics
            await ensure_topics(self.bootstrap, {self.topic: ROUTING_TOPIC_SHAPE})
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


async def read_routes(conn: AsyncConnection) -> dict[str, list[int]]:
    return {r.tenant_id: list(r.partitions) for r in await conn.execute(READ_ROUTES)}


async def recent_routes(conn: AsyncConnection, younger_than_s: float) -> frozenset[str]:
    return frozenset((await conn.execute(RECENT_ROUTES, {"p_age": younger_than_s})).scalars())
