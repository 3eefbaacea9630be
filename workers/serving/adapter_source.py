"""The engine's ``load_delta`` callback, backed by the adapter store, with typed errors.

Runs on the engine's loader thread (synchronous database access is right there).
"""

from __future__ import annotations

import logging

import time
from datetime import timedelta

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from schema.tables import Tenant, TenantChange
from workers.adapters.store import AdapterCorrupt, AdapterNotFound, AdapterStore, TenantNotFound
from workers.engine.batch import TenantDelta
from workers.engine.errors import AdapterLoadError, UnknownTenant
from workers.models import resolve_model_dir

log = logging.getLogger(__name__)


class StoreLoader:
    def __init__(self, store: AdapterStore, base_model_id: str):
        self.store = store
        self.base_model_id = base_model_id
        self.base_dir = resolve_model_dir(base_model_id, store.models_dir).resolve()

    def __call__(self, tenant_id: str) -> TenantDelta:
        try:
            d = self.store.load(tenant_id)
        except TenantNotFound as exc:
            raise UnknownTenant(str(exc)) from None
        except (AdapterNotFound, AdapterCorrupt) as exc:
            raise AdapterLoadError(str(exc)) from None
        except SQLAlchemyError as exc:
            raise AdapterLoadError(f"adapter store unreachable: {type(exc).__name__}") from None
        rec = d.record
        if rec.base_model_id != self.base_model_id:
            try:
                same = resolve_model_dir(rec.base_model_id, self.store.models_dir).resolve() == self.base_dir
            except LookupError:
                same = False
            if not same:
                raise AdapterLoadError(f"adapter of {tenant_id} is for base model {rec.base_model_id}; "
                                       f"this worker serves {self.base_model_id}")
        return TenantDelta(tenant_id=tenant_id, version=rec.version, pet_type=rec.pet_type,
                           config=rec.config, tensors=d.tensors)


class VersionFeed:
    """Tenants whose active adapter version switched (or who were created or deleted), read from
    the ``tenant_changes`` log after a cursor: a poll costs an index range scan over what changed
    since the last one, however many tenants are registered.

    Sequence values are taken when a row is written but become visible when its transaction
    commits, so an id below the cursor can appear late; ids skipped over are re-asked for until
    ``gap_ttl_s`` has passed (a rolled-back write leaves a permanent gap). When the log was pruned
    past the cursor (a worker away for longer than ``retention_s``) one full read stands in."""

    def __init__(self, store: AdapterStore, *, retention_s: float = 86400.0, gap_ttl_s: float = 300.0,
                 batch: int = 10000):
        self.sessions = store.sessions
        self.retention_s = retention_s
        self.gap_ttl_s = gap_ttl_s
        self.batch = batch
        self.cursor: int | None = None
        self.gaps: dict[int, float] = {}  # id -> monotonic time first missed
        self._pruned_at = 0.0

    def changes(self) -> list[tuple[str, int | None]]:
        """(tenant, its active version or None) for every change since the last call."""
        log_ = TenantChange.__table__.c
        with self.sessions() as s:
            if self.cursor is None:  # a starting worker holds nothing yet: only what follows matters
                self.cursor = s.scalar(select(func.coalesce(func.max(log_.id), 0)))
                return []
            oldest = s.scalar(select(func.min(log_.id)))
            if self.cursor and oldest is not None and oldest > self.cursor + 1:
                self.cursor = s.scalar(select(func.max(log_.id)))
                self.gaps.clear()
                return [tuple(r) for r in s.execute(select(Tenant.tenant_id, Tenant.active_version)).all()]
            cond = log_.id > self.cursor
            if self.gaps:
                cond = or_(cond, log_.id.in_(list(self.gaps)))
            rows = s.execute(select(log_.id, log_.tenant_id, log_.active_version)
                             .where(cond).order_by(log_.id).limit(self.batch)).all()
            self._prune(s)
        now = time.monotonic()
        for i, *_ in rows:
            self.gaps.pop(i, None)
        news = [i for i, *_ in rows if i > self.cursor]
        if news:
            for missing in set(range(self.cursor + 1, news[-1])) - set(news):
                self.gaps.setdefault(missing, now)
            self.cursor = news[-1]
        self.gaps = {i: t for i, t in self.gaps.items() if now - t < self.gap_ttl_s}
        return [(t, v) for _, t, v in rows]

    def _prune(self, s) -> None:
        if time.monotonic() - self._pruned_at < 3600:
            return
        self._pruned_at = time.monotonic()
        s.execute(delete(TenantChange).where(TenantChange.at < func.now() - timedelta(seconds=self.retention_s)))
        s.commit()
