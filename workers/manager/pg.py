"""asyncpg connections for the agent and the manager: DSN from FLOCK_DATABASE_URL, JSONB as
Python objects, and the NOTIFY channel that tells workers to re-read their leases now."""

from __future__ import annotations

import json

import asyncpg

LEASE_CHANNEL = "flock_leases"  # payload: the request topic whose leases changed


def dsn(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}://{rest}"


async def _codecs(conn: asyncpg.Connection) -> None:
    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str, app_name: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn(url), timeout=10, server_settings={"application_name": app_name[:63]})
    await _codecs(conn)
    return conn


async def pool(url: str, app_name: str, size: int = 3) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn(url), min_size=1, max_size=size, timeout=10, init=_codecs,
                                     server_settings={"application_name": app_name[:63]})


async def notify(conn, topic: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", LEASE_CHANNEL, topic)


# What a database outage looks like from asyncpg: retry later, never crash the data plane.
DB_ERRORS = (OSError, ConnectionError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
