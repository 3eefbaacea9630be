"""Tenant registry: create, list, show, delete (rows in ``tenants``; adapters cascade)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from schema.messages import TENANT_RE
from schema.tables import Adapter, Tenant
from workers.adapters.store import StoreError, TenantNotFound


class TenantExists(StoreError):
    pass


class InvalidTenantId(StoreError, ValueError):
    pass


@dataclass(frozen=True)
class TenantInfo:
    tenant_id: str
    display_name: str | None
    active_version: int | None
    adapters: int
    pet_type: str | None
    created_at: datetime | None


class TenantRegistry:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def create(self, tenant_id: str, display_name: str | None = None) -> TenantInfo:
        if not re.fullmatch(TENANT_RE, tenant_id):
            raise InvalidTenantId(f"tenant id {tenant_id!r} must match {TENANT_RE}")
        try:
            with self.sessions.begin() as s:
                s.add(Tenant(tenant_id=tenant_id, display_name=display_name))
        except IntegrityError:
            raise TenantExists(f"tenant {tenant_id!r} already exists") from None
        return self.show(tenant_id)

    def list(self) -> list[TenantInfo]:
        with self.sessions() as s:
            return [self._info(s, t) for t in s.scalars(select(Tenant).order_by(Tenant.tenant_id))]

    def show(self, tenant_id: str) -> TenantInfo:
        with self.sessions() as s:
            t = s.get(Tenant, tenant_id)
            if t is None:
                raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
            return self._info(s, t)

    def delete(self, tenant_id: str) -> None:
        with self.sessions.begin() as s:
            t = s.get(Tenant, tenant_id)
            if t is None:
                raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
            s.delete(t)

    @staticmethod
    def _info(s: Session, t: Tenant) -> TenantInfo:
        n = s.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == t.tenant_id))
        pet = None
        if t.active_version is not None:
            pet = s.scalar(select(Adapter.pet_type).where(Adapter.tenant_id == t.tenant_id,
                                                          Adapter.version == t.active_version))
        return TenantInfo(t.tenant_id, t.display_name, t.active_version, n or 0, pet, t.created_at)
