"""The durable adapter store: tenants' deltas as validated, content-addressed safetensors.

Imports validate everything before the first write and then write blob, adapter row and the
tenant's active version in one transaction, so a rejected import writes nothing. Loads verify
the sha256 of what comes back, so a tampered blob is refused rather than served.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from schema.tables import Adapter, AdapterBlob, Tenant
from workers.adapters.blobs import BlobBackend, BlobMissing, FilesystemBlobs, PostgresBlobs, sha256_hex
from workers.adapters.validate import AdapterRejected, check_delta, parse_safetensors
from workers.models import ModelNotFound, base_dims


class StoreError(Exception):
    """Base of the store's typed errors (the CLI prints the message and exits non-zero)."""


class TenantNotFound(StoreError, LookupError):
    pass


class AdapterNotFound(StoreError, LookupError):
    pass


class AdapterCorrupt(StoreError):
    """Stored bytes no longer match their checksum or layout."""


@dataclass(frozen=True)
class AdapterRecord:
    tenant_id: str
    version: int
    pet_type: str
    config: dict[str, Any]
    base_model_id: str
    sha256: str
    size_bytes: int
    status: str
    storage: str
    created_at: datetime | None

    @classmethod
    def of(cls, row: Adapter) -> "AdapterRecord":
        return cls(row.tenant_id, row.version, row.pet_type, dict(row.config), row.base_model_id,
                   row.sha256, row.size_bytes, row.status, row.storage, row.created_at)


@dataclass(frozen=True)
class StoredDelta:
    record: AdapterRecord
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class PreparedDelta:
    """A validated delta ready to be written: what `AdapterStore.prepare` returns."""

    pet_type: str
    config: dict[str, Any]
    base_model_id: str
    data: bytes
    sha256: str

    def row(self, tenant_id: str, version: int, storage: str) -> Adapter:
        return Adapter(tenant_id=tenant_id, version=version, pet_type=self.pet_type, config=self.config,
                       base_model_id=self.base_model_id, sha256=self.sha256, size_bytes=len(self.data),
                       storage=storage, status="ready")


def make_backend(kind: str, store_dir: Path) -> BlobBackend:
    return FilesystemBlobs(store_dir) if kind == "filesystem" else PostgresBlobs()


class AdapterStore:
    def __init__(self, sessions: sessionmaker[Session], backend: BlobBackend, *,
                 max_bytes: int = 256 * 1024 * 1024, models_dir: Path | None = None):
        self.sessions = sessions
        self.backend = backend
        self.max_bytes = max_bytes
        self.models_dir = models_dir

    # ------------------------------------------------------------ import
    def import_file(self, tenant_id: str, pet_type: str, config: Mapping[str, Any], data: bytes,
                    base_model_id: str, *, activate: bool = True) -> AdapterRecord:
        """Import a safetensors file in Flock's layout."""
        return self.import_tensors(tenant_id, pet_type, config, parse_safetensors(data, self.max_bytes),
                                   base_model_id, activate=activate)

    def import_tensors(self, tenant_id: str, pet_type: str, config: Mapping[str, Any],
                       tensors: Mapping[str, torch.Tensor], base_model_id: str, *,
                       activate: bool = True) -> AdapterRecord:
        prepared = self.prepare(pet_type, config, tensors, base_model_id)
        with self.sessions.begin() as s:
            tenant = s.get(Tenant, tenant_id, with_for_update=True)  # serialises version numbering
            if tenant is None:
                raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
            version = (s.scalar(select(func.max(Adapter.version)).where(Adapter.tenant_id == tenant_id)) or 0) + 1
            self.backend.put(s, prepared.sha256, prepared.data)
            row = prepared.row(tenant_id, version, self.backend.name)
            s.add(row)
            if activate:
                tenant.active_version = version
                tenant.updated_at = func.now()
            s.flush()
            s.refresh(row)
            return AdapterRecord.of(row)

    def prepare(self, pet_type: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                base_model_id: str) -> "PreparedDelta":
        """Everything an import checks and computes before touching the database: layout
        validation against the base model, the safetensors bytes, their size limit and sha256."""
        try:
            dims = base_dims(base_model_id, self.models_dir)
        except ModelNotFound as exc:
            raise AdapterRejected(str(exc)) from None
        check_delta(pet_type, config, tensors, dims)
        data = save_safetensors({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())})
        if len(data) > self.max_bytes:
            raise AdapterRejected(f"adapter of {len(data)} bytes exceeds the limit of {self.max_bytes}")
        return PreparedDelta(pet_type, dict(config), base_model_id, data, sha256_hex(data))

    # ------------------------------------------------------------ read
    def record(self, tenant_id: str, version: int | None = None) -> AdapterRecord:
        with self.sessions() as s:
            return AdapterRecord.of(self._row(s, tenant_id, version))

    def load(self, tenant_id: str, version: int | None = None) -> StoredDelta:
        """The tenant's active (or given) version, checksum-verified and re-validated."""
        with self.sessions() as s:
            row = self._row(s, tenant_id, version)
            try:
                data = self.backend.get(s, row.sha256)
            except BlobMissing as exc:
                raise AdapterCorrupt(str(exc)) from None
            rec = AdapterRecord.of(row)
        if sha256_hex(data) != rec.sha256:
            raise AdapterCorrupt(f"adapter {tenant_id} v{rec.version}: stored bytes fail their sha256")
        try:
            tensors = parse_safetensors(data, max(self.max_bytes, len(data)))
            check_delta(rec.pet_type, rec.config, tensors, base_dims(rec.base_model_id, self.models_dir))
        except (AdapterRejected, ModelNotFound) as exc:
            raise AdapterCorrupt(f"adapter {tenant_id} v{rec.version}: {exc}") from None
        return StoredDelta(rec, tensors)

    def _row(self, s: Session, tenant_id: str, version: int | None) -> Adapter:
        tenant = s.get(Tenant, tenant_id)
        if tenant is None:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
        version = version if version is not None else tenant.active_version
        if version is None:
            raise AdapterNotFound(f"tenant {tenant_id!r} has no adapter")
        row = s.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.version == version))
        if row is None:
            raise AdapterNotFound(f"tenant {tenant_id!r} has no adapter version {version}")
        return row

    def list(self, tenant_id: str | None = None) -> list[AdapterRecord]:
        with self.sessions() as s:
            q = select(Adapter).order_by(Adapter.tenant_id, Adapter.version)
            if tenant_id is not None:
                q = q.where(Adapter.tenant_id == tenant_id)
            return [AdapterRecord.of(r) for r in s.scalars(q)]

    def collect_garbage(self) -> int:
        """Delete Postgres blobs no adapter row refers to (after tenant deletes)."""
        with self.sessions.begin() as s:
            orphans = s.scalars(select(AdapterBlob.sha256).where(
                ~select(Adapter.id).where(Adapter.sha256 == AdapterBlob.sha256).exists())).all()
            for sha in orphans:
                self.backend.delete(s, sha)
            return len(orphans)

    def set_active(self, tenant_id: str, version: int) -> None:
        with self.sessions.begin() as s:
            self._row(s, tenant_id, version)
            s.execute(update(Tenant).where(Tenant.tenant_id == tenant_id)
                      .values(active_version=version, updated_at=func.now()))
