"""Following tenants' active adapter versions: one loop for the single-process worker and for
the engine process of a worker group (no database or torch imports: the caller hands in how to
read what changed — `adapter_source.VersionFeed.changes` — and how to drop a resident)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("flock.versions")


async def follow_active_versions(changes: Callable[[], list[tuple[str, int | None]]],
                                 invalidate: Callable[[str], None], interval_s: float) -> None:
    """Forever: drop the resident copy of every tenant that switched to another adapter version
    (or was deleted). While the database is away, what is resident keeps serving."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            changed = await loop.run_in_executor(None, changes)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep serving, ask again later
            log.warning("adapter version poll failed: %s", exc)
        else:
            for tenant in {t for t, _ in changed}:
                invalidate(tenant)
        await asyncio.sleep(interval_s)
