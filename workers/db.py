"""Database engines and sessions (synchronous: CLI, store, Alembic; the loops use their own)."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from workers.config import settings, sync_database_url


@lru_cache(maxsize=8)
def sync_engine(url: str | None = None) -> Engine:
    return create_engine(sync_database_url(url or settings().database_url), pool_pre_ping=True,
                         pool_size=5, max_overflow=5, connect_args={"connect_timeout": 10})


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(sync_engine(url), expire_on_commit=False)
