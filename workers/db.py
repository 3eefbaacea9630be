"""Database engines: synchronous sessions (CLI, store, Alembic) and the asyncio engine the
control plane's loops (worker agent, manager) run SQLAlchemy Core statements on."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from workers.config import async_database_url, settings, sync_database_url


@lru_cache(maxsize=8)
def sync_engine(url: str | None = None) -> Engine:
    return create_engine(sync_database_url(url or settings().database_url), pool_pre_ping=True,
                         pool_size=5, max_overflow=5, connect_args={"connect_timeout": 10})


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(sync_engine(url), expire_on_commit=False)


def async_engine(url: str | None = None, app_name: str = "flock", pool_size: int = 3,
                 pooled: bool = True) -> AsyncEngine:
    """asyncpg under SQLAlchemy Core, every statement its own transaction (AUTOCOMMIT): the
    control plane's changes are single conditional statements, seen by others at once.

    ``pooled=False``: a closed connection is really closed, and session state (the manager's
    advisory lock) goes with it."""
    pool = {"pool_size": pool_size, "max_overflow": 0} if pooled else {"poolclass": NullPool}
    return create_async_engine(async_database_url(url or settings().database_url), isolation_level="AUTOCOMMIT",
                               connect_args={"timeout": 10, "server_settings": {"application_name": app_name[:63]}},
                               **pool)
