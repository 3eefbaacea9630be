"""The control plane's database plumbing: SQLAlchemy Core on the async engine (workers/db.py)
for statements, a raw asyncpg connection only to LISTEN, and the NOTIFY channel that tells
workers to re-read their leases now."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import asyncpg
import sqlalchemy.exc
from sqlalchemy import Float, bindparam, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from workers.db import async_engine

LEASE_CHANNEL = "flock_leases"  # payload: the request topic whose leases changed


def dsn(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}://{rest}"


async def _codecs(conn: asyncpg.Connection) -> None:
    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str, app_name: str) -> asyncpg.Connection:
    """A raw asyncpg connection (JSONB as Python objects): for LISTEN, which SQLAlchemy does not do."""
    conn = await asyncpg.connect(dsn(url), timeout=10, server_settings={"application_name": app_name[:63]})
    await _codecs(conn)
    return conn


@asynccontextmanager
async def session(url: str, app_name: str) -> AsyncIterator[AsyncConnection]:
    """One unpooled connection for a short job (a CLI command), closed afterwards."""
    engine = async_engine(url, app_name, pooled=False)
    try:
        async with engine.connect() as conn:
            yield conn
    finally:
        await engine.dispose()


def secs(name: str) -> ColumnElement:
    """An interval of ``name`` seconds (a float bound at execution)."""
    return literal_column("interval '1 second'") * bindparam(name, type_=Float)


NOTIFY = select(func.pg_notify(LEASE_CHANNEL, bindparam("p_topic")))


async def notify(conn: AsyncConnection, topic: str) -> None:
    await conn.execute(NOTIFY, {"p_topic": topic})


# What a database outage looks like, from asyncpg directly or through SQLAlchemy: retry later,
# never crash the data plane.
DB_ERRORS = (OSError, ConnectionError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
             sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, sqlalchemy.exc.PendingRollbackError)
