"""Bulk registration: many tenants and their adapters in batched transactions, resumable.

A source is a directory whose sub-directories are tenants (named by tenant id, each an adapter
directory in PEFT or Flock-native form), or a JSONL manifest, one tenant per line::

    {"tenant_id": "acme", "path": "adapters/acme", "display_name": "Acme", "base_model": "...",
     "labels": ["neg", "pos"], "pooling": "mean"}

(``path`` relative to the manifest; all keys but ``tenant_id`` and ``path`` optional). Every adapter
is validated exactly as ``flockserve adapter import`` validates it (`AdapterStore.prepare`); a
refused one is reported with its reason and does not stop the others. A batch (tenants created if
missing, blobs, adapter rows, active versions) commits as one transaction, so an interrupted run
leaves whole batches. Re-running is safe: a tenant whose active adapter already has the same
bytes is counted as unchanged, not given a new version.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from schema.messages import TENANT_RE
from schema.tables import Adapter, Tenant
from workers.adapters.importers import read_adapter_dir
from workers.adapters.store import AdapterStore, PreparedDelta
from workers.adapters.validate import AdapterRejected


class ManifestError(ValueError):
    """The source itself is unreadable (not a refusal of one tenant)."""


@dataclass(frozen=True)
class BulkItem:
    tenant_id: str
    path: Path
    display_name: str | None = None
    base_model: str | None = None
    labels: list[str] | None = None
    pooling: str | None = None


@dataclass
class BulkReport:
    imported: int = 0
    unchanged: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (tenant id, reason)
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        return self.imported + self.unchanged + len(self.refused)

    @property
    def rate(self) -> float:
        return self.seen / self.seconds if self.seconds else 0.0


def read_source(source: Path) -> list[BulkItem]:
    """The tenants a directory or JSONL manifest names, in a stable order."""
    source = Path(source)
    if source.is_dir():
        return [BulkItem(d.name, d) for d in sorted(source.iterdir()) if d.is_dir()]
    if not source.is_file():
        raise ManifestError(f"{source}: no such directory or manifest")
    items = []
    for n, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path = Path(row["path"])
            items.append(BulkItem(str(row["tenant_id"]), path if path.is_absolute() else source.parent / path,
                                  row.get("display_name"), row.get("base_model"), row.get("labels"),
                                  row.get("pooling")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{source}:{n}: each line must be a JSON object with tenant_id and path ({exc})") from None
    return items


def _batches(items: list[BulkItem], size: int) -> Iterator[list[BulkItem]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def import_many(store: AdapterStore, items: list[BulkItem], *, default_base_model: str, activate: bool = True,
                batch_size: int = 500, max_bytes: int = 256 * 1024 * 1024,
                progress: Callable[[int], None] | None = None) -> BulkReport:
    """Validate and register ``items``; ``progress(n)`` after each item."""
    report = BulkReport()
    start = time.perf_counter()
    for batch in _batches(items, batch_size):
        ready: dict[str, tuple[BulkItem, PreparedDelta]] = {}
        for item in batch:
            reason = _prepare(store, item, default_base_model, max_bytes, ready)
            if reason:
                report.refused.append((item.tenant_id, reason))
            if progress:
                progress(1)
        if ready:
            imported, unchanged = _write_batch(store, ready, activate)
            report.imported += imported
            report.unchanged += unchanged
    report.seconds = time.perf_counter() - start
    return report


def _prepare(store: AdapterStore, item: BulkItem, default_base_model: str, max_bytes: int,
             ready: dict[str, tuple[BulkItem, PreparedDelta]]) -> str | None:
    if not re.fullmatch(TENANT_RE, item.tenant_id):
        return f"tenant id must match {TENANT_RE}"
    if item.tenant_id in ready:
        return "listed twice in this batch"
    try:
        imp = read_adapter_dir(item.path, labels=item.labels, pooling=item.pooling, max_bytes=max_bytes)
        ready[item.tenant_id] = (item, store.prepare(imp.pet_type, imp.config, imp.tensors,
                                                     item.base_model or default_base_model))
    except (AdapterRejected, OSError) as exc:
        return str(exc)
    return None


def _write_batch(store: AdapterStore, ready: dict[str, tuple[BulkItem, PreparedDelta]],
                 activate: bool) -> tuple[int, int]:
    ids = sorted(ready)
    with store.sessions.begin() as s:
        s.execute(pg_insert(Tenant).values([{"tenant_id": t, "display_name": ready[t][0].display_name} for t in ids])
                  .on_conflict_do_nothing(index_elements=["tenant_id"]))
        # Lock the batch's tenants (in id order: concurrent bulk runs cannot deadlock) so that
        # version numbers are assigned once.
        s.execute(select(Tenant.tenant_id).where(Tenant.tenant_id.in_(ids)).order_by(Tenant.tenant_id)
                  .with_for_update()).all()
        latest = dict(s.execute(select(Adapter.tenant_id, func.max(Adapter.version))
                                .where(Adapter.tenant_id.in_(ids)).group_by(Adapter.tenant_id)).all())
        active_sha = dict(s.execute(select(Adapter.tenant_id, Adapter.sha256).join(
            Tenant, (Tenant.tenant_id == Adapter.tenant_id) & (Tenant.active_version == Adapter.version))
            .where(Adapter.tenant_id.in_(ids))).all())
        fresh = [t for t in ids if active_sha.get(t) != ready[t][1].sha256]
        if fresh:
            store.backend.put_many(s, {ready[t][1].sha256: ready[t][1].data for t in fresh})
            rows = []
            for t in fresh:
                r = ready[t][1].row(t, (latest.get(t) or 0) + 1, store.backend.name)
                rows.append({c: getattr(r, c) for c in ("tenant_id", "version", "pet_type", "config",
                                                       "base_model_id", "sha256", "size_bytes", "storage", "status")})
            s.execute(insert(Adapter.__table__), rows)  # Core executemany: one round trip per batch
            if activate:
                tenants = Tenant.__table__
                s.execute(update(tenants).where(tenants.c.tenant_id == bindparam("tid"))
                          .values(active_version=bindparam("v"), updated_at=func.now()),
                          [{"tid": r["tenant_id"], "v": r["version"]} for r in rows])
    return len(fresh), len(ids) - len(fresh)
