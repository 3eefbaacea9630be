"""Following adapter versions: the follower loop, and the change-log feed on real PostgreSQL with
thousands of tenants registered — a poll reads what changed, never the whole tenants table."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import delete, event, func, select, text, update

from schema.tables import Tenant, TenantChange
from workers.adapters.store import AdapterStore, make_backend
from workers.serving.adapter_source import VersionFeed
from workers.serving.versions import follow_active_versions
from workers.tenants import TenantRegistry


async def test_changed_tenants_are_invalidated_and_failures_are_survived():
    views = [[("a", 2)], OSError("database away"), [("b", 2), ("b", 3)], [("c", None)]]
    polls, dropped = [], []

    def changes():
        polls.append(1)
        view = views[len(polls) - 1] if len(polls) <= len(views) else []
        if isinstance(view, Exception):
            raise view
        return view
    task = asyncio.create_task(follow_active_versions(changes, dropped.append, 0.001))
    while len(polls) < len(views) + 2:
        await asyncio.sleep(0.005)
    task.cancel()
    assert dropped == ["a", "b", "c"]  # b once per poll however often it changed within it


@pytest.fixture()
def many(sessions, database_url, unique):
    """3,000 registered tenants (plain inserts: the feed does not care how they came)."""
    ids = [f"v{unique}-{i:04d}" for i in range(3000)]
    with sessions.begin() as s:
        s.execute(Tenant.__table__.insert(), [{"tenant_id": t, "active_version": 1} for t in ids])
    return ids


def _statements(sessions):
    seen: list[str] = []
    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, *a: seen.append(stmt))
    return seen


def _set_version(sessions, tenant: str, version: int) -> None:
    with sessions.begin() as s:
        s.execute(update(Tenant).where(Tenant.tenant_id == tenant).values(active_version=version))


def test_feed_reads_changes_not_tenants(sessions, many):
    feed = VersionFeed(AdapterStore(sessions, make_backend("postgres", None)))
    assert feed.changes() == []  # a starting worker starts at the end of the log
    _set_version(sessions, many[1234], 2)
    with sessions.begin() as s:  # a name change is not a version change
        s.execute(update(Tenant).where(Tenant.tenant_id == many[7]).values(display_name="renamed"))
    TenantRegistry(sessions).delete(many[99])
    seen = _statements(sessions)
    assert feed.changes() == [(many[1234], 2), (many[99], None)]
    assert feed.changes() == []
    reads = [q for q in seen if q.lstrip().upper().startswith("SELECT")]
    assert reads and not any("FROM tenants" in q for q in reads), reads  # the log only, by index range
    assert all("tenant_changes.id >" in q or "max(" in q or "min(" in q for q in reads)


def test_late_commit_below_the_cursor_is_not_missed(sessions, database_url, many):
    feed = VersionFeed(AdapterStore(sessions, make_backend("postgres", None)))
    feed.changes()
    slow = sessions()
    slow.execute(update(Tenant).where(Tenant.tenant_id == many[1]).values(active_version=5))  # takes id n
    _set_version(sessions, many[2], 6)  # takes id n+1, commits first
    assert feed.changes() == [(many[2], 6)]
    slow.commit()
    slow.close()
    assert feed.changes() == [(many[1], 5)]
    assert feed.gaps == {}


def test_log_pruned_past_the_cursor_falls_back_to_one_full_read(sessions, many):
    feed = VersionFeed(AdapterStore(sessions, make_backend("postgres", None)))
    feed.changes()
    for v in (2, 3):
        _set_version(sessions, many[0], v)
    with sessions.begin() as s:  # what a long absence looks like: the first change was pruned
        first = s.scalar(select(func.min(TenantChange.id)).where(TenantChange.id > feed.cursor))
        s.execute(delete(TenantChange).where(TenantChange.id <= first))
        s.execute(text("select 1"))
    full = dict(feed.changes())
    assert full[many[0]] == 3 and len(full) >= len(many)
    _set_version(sessions, many[5], 9)
    assert feed.changes() == [(many[5], 9)]
