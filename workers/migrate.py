"""Alembic driven from code, so `flockserve db ...` works from an installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from workers.config import settings, sync_database_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", sync_database_url(url or settings().database_url))
    return cfg


def upgrade(revision: str = "head", url: str | None = None) -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str = "-1", url: str | None = None) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str | None = None) -> tuple[str | None, str | None]:
    """(revision the database is at, head revision of this code)."""
    cfg = alembic_config(url)
    engine = create_engine(cfg.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            db_rev = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    return db_rev, ScriptDirectory.from_config(cfg).get_current_head()
