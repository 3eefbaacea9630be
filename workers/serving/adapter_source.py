"""The engine's ``load_delta`` callback, backed by the adapter store, with typed errors.

Runs on the engine's loader thread (synchronous database access is right there).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from schema.tables import Tenant
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


def active_versions(store: AdapterStore) -> dict[str, int | None]:
    """tenant -> active adapter version, to spot upgrades and drop stale residents."""
    with store.sessions() as s:
        return dict(s.execute(select(Tenant.tenant_id, Tenant.active_version)).all())
