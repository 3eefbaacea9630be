"""Shared fixtures. Kafka and PostgreSQL are real: `make test` starts them with scripts/services.

Nothing here skips when a service is missing: a missing service is a failed set-up and every
test that needs it errors loudly.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from workers.config import settings  # noqa: E402


def _reachable(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = settings().kafka_bootstrap.split(",")[0]
    if not _reachable(bootstrap):
        pytest.fail(f"Apache Kafka is not reachable at {bootstrap}: run `scripts/services up` "
                    "(make test does) or set FLOCK_KAFKA_BOOTSTRAP", pytrace=False)
    return settings().kafka_bootstrap


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh database for this test session, migrated to head, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool  # outlives database restarts in the fault tests

    from workers import migrate
    from workers.config import sync_database_url

    admin_url = make_url(sync_database_url(settings().database_url))
    name = f"flock_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(admin_url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure here is a broken set-up
        pytest.fail(f"PostgreSQL is not usable at {admin_url.render_as_string(hide_password=True)}: {exc}. "
                    "Run `scripts/services up` (make test does) or set FLOCK_DATABASE_URL", pytrace=False)
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade("head", url)
    yield url
    from workers.db import sync_engine
    sync_engine.cache_clear()
    with admin.connect() as c:
        c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def sessions(database_url):
    from workers.db import session_factory
    return session_factory(database_url)


@pytest.fixture()
def unique() -> str:
    """A short unique suffix for names (topics, tenants) so tests never see each other's data."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def minilm_dir():
    from workers.models import resolve_model_dir
    return resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
