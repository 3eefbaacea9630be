"""Settings from the environment (``FLOCK_*``), with defaults for the local services."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schema import topics

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_", extra="ignore")

    # Services (scripts/services starts these on loopback; compose.yaml maps the same ports).
    kafka_bootstrap: str = "127.0.0.1:19092"
    database_url: str = "postgresql://flock:flock@127.0.0.1:15432/flock"

    # Topics
    requests_topic: str = topics.REQUESTS_TOPIC
    replies_topic: str = topics.REPLIES_TOPIC
    dlq_topic: str = topics.DLQ_TOPIC
    request_partitions: int = topics.REQUEST_PARTITIONS
    consumer_group: str = topics.CONSUMER_GROUP

    # Adapter store
    store_backend: str = Field("postgres", pattern="^(postgres|filesystem)$")
    store_dir: Path = REPO_ROOT / ".flock" / "blobs"
    max_adapter_bytes: int = 256 * 1024 * 1024
    default_base_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    models_dir: Path = REPO_ROOT / ".flock" / "models"

    # Worker
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    device: str = "auto"


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


def _with_driver(url: str, driver: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}+{driver}://{rest}"


def sync_database_url(url: str) -> str:
    """The database through the synchronous driver (CLI, Alembic, the adapter store)."""
    return _with_driver(url, "psycopg2")


def async_database_url(url: str) -> str:
    """The database through the asyncio driver (worker and manager event loops)."""
    return _with_driver(url, "asyncpg")
