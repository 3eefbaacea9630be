"""`flockserve send | load`: requests through the client SDK."""

from __future__ import annotations

import asyncio
from typing import Annotated, Optional

import typer

from workers.cli.app import CliError, JsonFlag, app, emit, err, fail, out, print_json, run_cli, sessions


def _reply_row(reply) -> dict:
    o = reply.outputs or {}
    return {"request_id": reply.request_id, "tenant_id": reply.tenant_id, "status": reply.status.value,
            "label": o.get("label") or (" ".join(o.get("token_labels", [])) or None),
            "score": round(max(o["scores"]), 4) if o.get("scores") else None,
            "adapter_version": reply.adapter_version, "worker_id": reply.worker_id,
            "total_ms": (reply.timings or {}).get("total_ms"), "error": reply.error_message}


@app.command("send")
def send_cmd(tenant_id: str, text: str,
             pair: Annotated[Optional[str], typer.Option(help="Second text segment.")] = None,
             timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 30.0,
             as_json: JsonFlag = False) -> None:
    """Send one request and print its reply (exit 1 when the reply is an error)."""
    from workers.client import FlockClient, FlockTimeout

    async def go():
        async with FlockClient(tenant=tenant_id) as c:  # signs with FLOCK_TENANT_KEY; reads its reply topic
            return await c.infer(tenant_id, text, text_pair=pair, timeout=timeout)

    def run():
        try:
            return asyncio.run(go())
        except FlockTimeout as exc:
            raise CliError(str(exc)) from None

    reply = run_cli(run)
    if as_json:
        print_json(reply.to_wire())
    else:
        # One field per line: a reply has more fields than 80 columns hold side by side.
        emit([{"field": k, "value": v} for k, v in _reply_row(reply).items() if v is not None], False,
             ["field", "value"], title="reply")
    if not reply.ok:
        raise typer.Exit(1)


@app.command("load")
def load_cmd(count: Annotated[int, typer.Option(help="Requests to send.")] = 1000,
             rate: Annotated[float, typer.Option(help="Requests per second (open loop).")] = 200.0,
             tenants: Annotated[Optional[str], typer.Option(
                 help="Comma-separated tenants (default: all with adapters).")] = None,
             dist: Annotated[str, typer.Option(help="uniform | zipf")] = "uniform",
             zipf_s: Annotated[float, typer.Option(help="Zipf exponent.")] = 1.1,
             min_words: Annotated[int, typer.Option()] = 4, max_words: Annotated[int, typer.Option()] = 60,
             timeout: Annotated[float, typer.Option()] = 60.0, seed: Annotated[int, typer.Option()] = 0,
             as_json: JsonFlag = False) -> None:
    """Generate load and report throughput, latency percentiles and reply statuses."""
    from rich.progress import Progress

    from workers.client import FlockClient
    from workers.loadgen import run_load
    from workers.tenants import TenantRegistry

    names = tenants.split(",") if tenants else [t.tenant_id for t in run_cli(lambda: TenantRegistry(sessions()).list())
                                                 if t.active_version is not None]
    if not names:
        fail("no tenants with adapters (flockserve adapter import ...)")
        raise typer.Exit(1)

    async def go():
        async with FlockClient() as c:
            with Progress(console=err, transient=True, disable=as_json) as bar:
                task = bar.add_task("requests", total=count)
                return await run_load(c, names, rate=rate, count=count, dist=dist, zipf_s=zipf_s,
                                      min_words=min_words, max_words=max_words, timeout=timeout, seed=seed,
                                      progress=lambda done, total: bar.update(task, completed=done))

    report = run_cli(lambda: asyncio.run(go())).summary()
    if as_json:
        print_json(report)
    else:
        emit({k: v for k, v in report.items() if k != "statuses"}, False,
             ["sent", "replied", "timeouts", "duration_s", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "duplicates"],
             title="load")
        out.print("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(report["statuses"].items())))
    if report["timeouts"]:
        raise typer.Exit(1)
