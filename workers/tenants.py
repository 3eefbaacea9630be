"""Tenant registry: create, list, show, delete (rows in ``tenants``; adapters cascade)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

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


@dataclass(frozen=True)
class TenantPage:
    tenants: list[TenantInfo]
    next_after: str | None  # pass as ``after`` for the next page; None on the last page


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
        """Every tenant (small deployments, tests); `page` for the CLI and large deployments."""
        out, after = [], None
        while True:
            page = self.page(limit=1000, after=after)
            out += page.tenants
            if page.next_after is None:
                return out
            after = page.next_after

    def page(self, *, limit: int = 100, after: str | None = None, prefix: str | None = None,
             pet_type: str | None = None) -> TenantPage:
        """One page in tenant-id order (keyset paging: stable while tenants come and go), with a
        prefix and an active-PET-type filter; one query, whatever the number of tenants."""
        active = aliased(Adapter)
        n_adapters = (select(func.count()).select_from(Adapter).where(Adapter.tenant_id == Tenant.tenant_id)
                      .correlate(Tenant).scalar_subquery())
        q = (select(Tenant, n_adapters, active.pet_type)
             .outerjoin(active, (active.tenant_id == Tenant.tenant_id) & (active.version == Tenant.active_version))
             .order_by(Tenant.tenant_id).limit(limit + 1))
        if after is not None:
            q = q.where(Tenant.tenant_id > after)
        if prefix:
            q = q.where(Tenant.tenant_id.startswith(prefix, autoescape=True))
        if pet_type:
            q = q.where(active.pet_type == pet_type)
        with self.sessions() as s:
            rows = s.execute(q).all()
        infos = [TenantInfo(t.tenant_id, t.display_name, t.active_version, n or 0, pet, t.created_at)
                 for t, n, pet in rows[:limit]]
        return TenantPage(infos, infos[-1].tenant_id if len(rows) > limit else None)

    def count(self) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(Tenant)) or 0

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
