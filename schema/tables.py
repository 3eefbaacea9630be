"""Database contract: SQLAlchemy 2 declarative tables. No sessions, no business logic.

Alembic revisions in ``migrations/`` create exactly these tables; a test checks that
autogenerate finds no drift between the two.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Text, UniqueConstraint, func)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schema.pet import PET_TYPES

# Stable constraint names so that migrations can refer to them.
NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
          "pk": "pk_%(table_name)s"}



class AdapterStatus(StrEnum):
    READY = "ready"
    RETIRED = "retired"


class WorkerState(StrEnum):
    """A worker's lifecycle (docs/manager.md). A new state: add it here and write a migration
    for the check constraint."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"  # an operator asked for its partitions to move off; it keeps serving
    STOPPED = "stopped"
    DEAD = "dead"  # missed heartbeats for FLOCK_WORKER_TIMEOUT_S


# Live: still running, its load counts. Accepting: may be given partitions.
LIVE_WORKER_STATES = (WorkerState.STARTING, WorkerState.SERVING, WorkerState.DRAINING)
ACCEPTING_WORKER_STATES = (WorkerState.STARTING, WorkerState.SERVING)


class LeaseState(StrEnum):
    ACTIVE = "active"
    RELEASING = "releasing"  # hand-over: the target is ready, the source drains and commits
    RELEASED = "released"


ADAPTER_STATES = tuple(AdapterStatus)
WORKER_STATES = tuple(WorkerState)
LEASE_STATES = tuple(LeaseState)
JOB_STATES = ("queued", "running", "succeeded", "failed")


def _in(col: str, values: tuple[str, ...]) -> str:
    return f"{col} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"
    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    # The adapter version requests are served with; NULL until the first import.
    active_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())
    __table_args__ = (CheckConstraint("tenant_id ~ '^[a-z0-9][a-z0-9._-]{0,62}$'", name="tenant_id_format"),)


class TenantChange(Base):
    """Change log of ``tenants``: one row per created or deleted tenant and per switch of its
    active version, written by a trigger (migration 0005) whatever wrote the tenant. Workers
    follow it with a cursor instead of re-reading every tenant (serving/adapter_source.py)."""

    __tablename__ = "tenant_changes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    active_version: Mapped[int | None] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, server_default="false")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (Index("ix_tenant_changes_at", "at"),)


class AdapterBlob(Base):
    """Content-addressed safetensors bytes (the Postgres store backend)."""

    __tablename__ = "adapter_blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Adapter(Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    pet_type: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)
    base_model_id: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))  # blob key in whichever backend holds it
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage: Mapped[str] = mapped_column(String(16), server_default="postgres")
    status: Mapped[str] = mapped_column(String(16), server_default=AdapterStatus.READY.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (
        UniqueConstraint("tenant_id", "version", name="uq_adapters_tenant_version"),
        CheckConstraint(_in("pet_type", PET_TYPES), name="pet_type"),
        CheckConstraint(_in("status", ADAPTER_STATES), name="status"),
        CheckConstraint("version >= 1", name="version_positive"),
        Index("ix_adapters_sha256", "sha256"),
    )


class Worker(Base):
    __tablename__ = "workers"
    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[float] = mapped_column(Float, server_default="1.0")  # relative tokens/s
    state: Mapped[str] = mapped_column(String(16), server_default=WorkerState.STARTING.value)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    # The request topic it serves, and whether it takes partitions from the manager's leases
    # (False: static FLOCK_PARTITIONS; the manager leaves such a worker alone).
    topic: Mapped[str | None] = mapped_column(String(249))
    follows_leases: Mapped[bool] = mapped_column(Boolean, server_default="false")
    __table_args__ = (CheckConstraint(_in("state", WORKER_STATES), name="state"),)


class PartitionLease(Base):
    __tablename__ = "partition_leases"
    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.worker_id", ondelete="SET NULL"))
    epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    state: Mapped[str] = mapped_column(String(16), server_default=LeaseState.RELEASED.value)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())
    # Hand-over in progress: the target; it prefetches hot_tenants, then flips state to 'releasing'.
    next_worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.worker_id", ondelete="SET NULL"))
    handover_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    hot_tenants: Mapped[list[str]] = mapped_column(JSONB, server_default="[]")
    # When the current owner got it (the balancer's minimum dwell time).
    assigned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint(_in("state", LEASE_STATES), name="state"),
        CheckConstraint("partition >= 0", name="partition_nonnegative"),
        Index("ix_partition_leases_worker_id", "worker_id"),
    )


class TenantRoute(Base):
    """Hot tenants spread over several partitions (the SDK falls back to hashing)."""

    __tablename__ = "tenant_routes"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id", ondelete="CASCADE"), primary_key=True)
    partitions: Mapped[list[int]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())


class AuditEvent(Base):
    """What operators changed (imports, deletes, rebalances), for `flockserve status` and forensics."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    note: Mapped[str | None] = mapped_column(Text)


class TrainingJob(Base):
    """One training job from the ``flock.train`` topic and its outcome (``flockserve job list``).

    No foreign key to ``tenants``: a job naming an unknown tenant is still recorded, as failed.
    """

    __tablename__ = "training_jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), server_default="queued")
    pet_type: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")  # config + options, no data
    data_source: Mapped[str] = mapped_column(Text)  # "inline:<rows>" or the URI
    reply_to: Mapped[str | None] = mapped_column(String(249))
    # Times a trainer picked the job up; a redelivery past FLOCK_TRAIN_MAX_ATTEMPTS fails it.
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    trainer_id: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    code: Mapped[str | None] = mapped_column(String(32))  # failed: schema/train.py FailureCode
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint(_in("state", JOB_STATES), name="state"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index("ix_training_jobs_tenant_id", "tenant_id"),
        Index("ix_training_jobs_state", "state"),
    )


class TenantKey(Base):
    """A tenant's request-signing key (HMAC-SHA256, workers/auth.py). The secret itself is stored:
    a worker must recompute the MAC, so database read access means key access (docs/security.md).
    After a rotation the old key keeps working until ``expires_at``; a revoked key at once stops."""

    __tablename__ = "tenant_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id", ondelete="CASCADE"))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_tenant_keys_tenant_id", "tenant_id"),)
