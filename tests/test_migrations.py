"""Alembic on real PostgreSQL: up, down, up again; and no drift between tables and revisions."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool  # outlives database restarts in the fault tests

from schema.tables import Base
from workers import migrate


@pytest.fixture()
def scratch_db(database_url):
    admin_url = make_url(database_url).set(database="postgres")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"flock_mig_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _tables(url: str) -> set[str]:
    e = create_engine(url)
    try:
        return set(inspect(e).get_table_names()) - {"alembic_version"}
    finally:
        e.dispose()


def test_upgrade_downgrade_upgrade(scratch_db):
    assert migrate.current(scratch_db)[0] is None
    migrate.upgrade("head", scratch_db)
    db_rev, head = migrate.current(scratch_db)
    assert db_rev == head
    assert _tables(scratch_db) == set(Base.metadata.tables)
    migrate.downgrade("base", scratch_db)
    assert migrate.current(scratch_db)[0] is None
    assert _tables(scratch_db) == set()
    migrate.upgrade("head", scratch_db)
    assert _tables(scratch_db) == set(Base.metadata.tables)


def test_autogenerate_finds_no_drift(database_url):
    e = create_engine(database_url)
    with e.connect() as c:
        ctx = MigrationContext.configure(c, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    e.dispose()
    assert diff == [], f"schema/tables.py and migrations/ disagree: {diff}"
