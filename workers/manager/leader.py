"""One active manager per request topic: a PostgreSQL session-level advisory lock.

The lock lives as long as the leader's connection: a killed leader's connection closes, the
server drops the lock, and a standby polling ``pg_try_advisory_lock`` takes over. The leader
checks its connection every tick and stops acting the moment it is gone (NotLeader). The tick's
statements run on this same connection, so a leader whose session died can change nothing."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sqlalchemy import Integer, bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.db import async_engine
from workers.manager import pg
from workers.manager.errors import NotLeader

log = logging.getLogger("flock.manager")

LOCK_CLASS = 0x464C4F43  # "FLOC": first half of the two-int advisory lock key


def lock_key(topic: str) -> int:
    return int.from_bytes(hashlib.sha256(topic.encode()).digest()[:4], "big", signed=True)


TRY_LOCK = select(func.pg_try_advisory_lock(LOCK_CLASS, bindparam("p_key", type_=Integer)))  # (int4, int4)
PING = select(1)
# application_name of the session holding the topic's manager lock (pg_locks splits the key).
LEADER = text("""
    SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = (CAST(:cls AS int8) & 4294967295)
      AND l.objid::int8 = (CAST(:key AS int8) & 4294967295)
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())""")


class Leadership:
    def __init__(self, database_url: str, topic: str, manager_id: str):
        self.url, self.topic, self.manager_id = database_url, topic, manager_id
        # Unpooled: closing the connection must end the session, and the lock with it.
        self.engine = async_engine(database_url, f"flock-manager:{manager_id}", pooled=False)
        self.conn: AsyncConnection | None = None

    def _lost(self) -> bool:
        return self.conn is None or self.conn.closed or self.conn.invalidated

    async def acquire(self, poll_s: float, stop: asyncio.Event) -> bool:
        """Wait until this manager leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self._lost():
                    self.conn = await self.engine.connect()
                if (await self.conn.execute(TRY_LOCK, {"p_key": lock_key(self.topic)})).scalar():
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
            if self._lost():
                raise NotLeader("leader connection closed")
            await asyncio.wait_for(self.conn.execute(PING), 5)
        except (pg.DB_ERRORS) as exc:
            await self.release()
            raise NotLeader(f"leader connection lost: {exc}") from None

    async def release(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # noqa: BLE001 - closing a broken connection: drop it without the goodbye
                try:
                    await conn.invalidate()
                except Exception:  # noqa: BLE001
                    pass


async def current_leader(conn: AsyncConnection, topic: str) -> str | None:
    """application_name of the session holding the topic's manager lock, if any."""
    return (await conn.execute(LEADER, {"cls": LOCK_CLASS, "key": lock_key(topic)})).scalar()
