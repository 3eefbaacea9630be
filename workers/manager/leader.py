"""One active manager per request topic: a PostgreSQL session-level advisory lock.

The lock lives as long as the leader's connection: a killed leader's connection closes, the
server drops the lock, and a standby polling ``pg_try_advisory_lock`` takes over. The leader
checks its connection every tick and stops acting the moment it is gone (NotLeader)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from workers.manager import pg
from workers.manager.errors import NotLeader

log = logging.getLogger("flock.manager")

LOCK_CLASS = 0x464C4F43  # "FLOC": first half of the two-int advisory lock key


def lock_key(topic: str) -> int:
    return int.from_bytes(hashlib.sha256(topic.encode()).digest()[:4], "big", signed=True)


class Leadership:
    def __init__(self, database_url: str, topic: str, manager_id: str):
        self.url, self.topic, self.manager_id = database_url, topic, manager_id
        self.conn = None

    async def acquire(self, poll_s: float, stop: asyncio.Event) -> bool:
        """Wait until this manager leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self.conn is None or self.conn.is_closed():
                    self.conn = await pg.connect(self.url, f"flock-manager:{self.manager_id}")
                if await self.conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, lock_key(self.topic)):
                    log.info("manager %s leads %s", self.manager_id, self.topic)
                    return True
                if not announced:
                    log.info("manager %s on standby for %s", self.manager_id, self.topic)
                    announced = True
            except pg.DB_ERRORS as exc:
                log.warning("database unreachable while waiting for leadership: %s", exc)
                await self.release()
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        return False

    async def check(self) -> None:
        try:
            if self.conn is None or self.conn.is_closed():
                raise NotLeader("leader connection closed")
            await asyncio.wait_for(self.conn.fetchval("SELECT 1"), 5)
        except (pg.DB_ERRORS) as exc:
            await self.release()
            raise NotLeader(f"leader connection lost: {exc}") from None

    async def release(self) -> None:
        if self.conn is not None:
            try:
                await asyncio.wait_for(self.conn.close(), 5)
            except Exception:  # noqa: BLE001
                self.conn.terminate()
            self.conn = None


async def current_leader(conn, topic: str) -> str | None:
    """application_name of the session holding the topic's manager lock, if any."""
    return await conn.fetchval("""
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = ($1::int8 & 4294967295)
          AND l.objid::int8 = ($2::int8 & 4294967295) AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
                               LOCK_CLASS, lock_key(topic))
