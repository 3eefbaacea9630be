"""A minimal HTTP endpoint on the worker's event loop: /metrics, /livez, /readyz."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


async def serve_http(host: str, port: int, registry: CollectorRegistry, live: Callable[[], bool],
                     ready: Callable[[], bool],
                     metrics: Callable[[], Awaitable[bytes]] | None = None) -> asyncio.base_events.Server:
    """``metrics``, when given, makes the /metrics body (a worker group merges its processes')."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                body = await metrics() if metrics is not None else generate_latest(registry)
                status, ctype = 200, CONTENT_TYPE_LATEST
            elif path in ("/livez", "/readyz"):
                ok = (live if path == "/livez" else ready)()
                status, ctype, body = (200 if ok else 503), "text/plain", (b"ok\n" if ok else b"not ready\n")
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
