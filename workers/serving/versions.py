"""Following tenants' active adapter versions: one loop for the single-process worker and for
the engine process of a worker group (no database or torch imports: the caller hands in how to
read the versions and how to drop a resident)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("flock.versions")


async def follow_active_versions(active_versions: Callable[[], dict[str, int | None]],
                                 invalidate: Callable[[str], None], interval_s: float) -> None:
    """Forever: drop residents whose tenant switched to another adapter version (or was deleted).
    While the database is away, what is resident keeps serving."""
    loop = asyncio.get_running_loop()
    seen: dict[str, int | None] = {}
    while True:
        try:
            current = await loop.run_in_executor(None, active_versions)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep serving, ask again later
            log.warning("adapter version poll failed: %s", exc)
        else:
            for tenant, version in current.items():
                if tenant in seen and seen[tenant] != version:
                    invalidate(tenant)
            for tenant in set(seen) - set(current):
                invalidate(tenant)
            seen = current
        await asyncio.sleep(interval_s)
