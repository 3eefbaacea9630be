"""`flockserve manager | status | rebalance`: the control plane."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from workers.cli.app import JsonFlag, app, emit, out, print_json, run_cli

WORKER_STATUS_COLS = ["worker_id", "state", "mode", "device", "capacity", "heartbeat_age_s", "partitions", "load",
                      "tokens_per_s", "queue_depth", "inflight", "resident_tenants", "free_adapter_bytes"]
LEASE_COLS = ["partition", "worker_id", "epoch", "state", "next_worker_id", "expires_in_s", "load", "lag",
              "hot_tenants"]


@app.command("manager")
def manager_cmd() -> None:
    """Run the control plane: leader election, leases, failure take-over, rebalancing, hot-tenant routes."""
    from workers.config import Settings
    from workers.manager.manager import main as manager_main
    manager_main(Settings())


@app.command("status")
def status_cmd(as_json: JsonFlag = False,
               lag: Annotated[bool, typer.Option(help="Ask Kafka for lag per partition.")] = True) -> None:
    """Workers, leases, lag per partition, load, resident tenants, the leading manager."""
    from workers.config import settings
    from workers.manager.status import gather_status

    st = run_cli(lambda: asyncio.run(gather_status(settings(), with_lag=lag)))
    if as_json:
        print_json(st)
        return
    out.print(f"topic {st['topic']}; manager: {st['leader'] or '[yellow]none leading[/]'}")
    emit(st["workers"], False, WORKER_STATUS_COLS, title="workers")
    emit(st["leases"], False, LEASE_COLS, title="partition leases")
    if st["routes"]:
        emit([{"tenant_id": t, "partitions": p} for t, p in sorted(st["routes"].items())], False,
             ["tenant_id", "partitions"], title="spread tenants")


@app.command("rebalance")
def rebalance_cmd(apply: Annotated[bool, typer.Option("--apply", help="Start the hand-overs.")] = False,
                  force: Annotated[bool, typer.Option("--force", help="Ignore threshold and minimum dwell time.")] = False,
                  as_json: JsonFlag = False) -> None:
    """Print partition moves and the predicted imbalance before/after; --apply carries them out."""
    from workers.config import settings
    from workers.manager.admin import rebalance

    plan, started = run_cli(lambda: asyncio.run(rebalance(settings(), apply=apply, force=force)))
    rows = [{"partition": m.partition, "from": m.source, "to": m.target, "load": round(m.cost, 1),
             "reason": m.reason, "started": (m in started) if apply else None} for m in plan.moves]
    info = {"imbalance_before": round(plan.imbalance_before, 3), "imbalance_after": round(plan.imbalance_after, 3),
            "load_before": {k: round(v, 1) for k, v in plan.load_before.items()},
            "load_after": {k: round(v, 1) for k, v in plan.load_after.items()}, "moves": rows, "applied": apply}
    if as_json:
        print_json(info)
        return
    emit(rows, False, ["partition", "from", "to", "load", "reason"] + (["started"] if apply else []), title="moves")
    out.print(f"imbalance (max/mean load) {info['imbalance_before']} -> {info['imbalance_after']} predicted"
              + ("" if apply else "; --apply to carry out"))
