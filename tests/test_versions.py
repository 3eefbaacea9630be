"""The adapter-version follower: a tenant whose active version changes or who is deleted loses
its resident copy; a store failure changes nothing and the loop keeps asking."""

import asyncio

from workers.serving.versions import follow_active_versions


async def test_changed_and_deleted_tenants_are_invalidated_and_failures_are_survived():
    views = [{"a": 1, "b": 1, "c": None}, OSError("database away"), {"a": 1, "b": 2, "c": None},
             {"a": 1, "c": 3}]
    polls, dropped = [], []

    def active_versions():
        polls.append(1)
        view = views[min(len(polls), len(views)) - 1]
        if isinstance(view, Exception):
            raise view
        return view
    task = asyncio.create_task(follow_active_versions(active_versions, dropped.append, 0.001))
    while len(polls) < len(views) + 2:
        await asyncio.sleep(0.005)
    task.cancel()
    # b: 1 -> 2 (after the failed poll), then b deleted and c None -> 3; a never changed.
    assert sorted(dropped) == ["b", "b", "c"]
    assert "a" not in dropped
