"""Alembic environment: runs revisions against FLOCK_DATABASE_URL (or the URL the caller set)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from schema.tables import Base
from workers.config import settings, sync_database_url

config = context.config
target_metadata = Base.metadata
url = config.get_main_option("sqlalchemy.url") or sync_database_url(settings().database_url)


def run_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      compare_type=True, compare_server_default=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connectable = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          compare_type=True, compare_server_default=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
