"""`flockserve worker run | drain`: the data-plane process and what operators do to workers."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Optional

import typer

from workers.cli.app import JsonFlag, out, print_json, run_cli, app

worker_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                         help="Workers: `run` one (a GPU/CPU data-plane process), `drain` one.")
app.add_typer(worker_app, name="worker")

Partitions = Annotated[Optional[str], typer.Option(help='Request partitions: "all", "0,2-5", or "leases" '
                                                        '(follow the manager).')]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")]


def _run_worker(partitions: Optional[str], device: Optional[str]) -> None:
    from workers.config import Settings
    from workers.serving.main import main as worker_main

    over = {k: v for k, v in {"partitions": partitions, "device": device}.items() if v is not None}
    worker_main(Settings(**over))


@worker_app.callback()
def worker_group(ctx: typer.Context, partitions: Partitions = None, device: Device = None) -> None:
    """Workers: `run` one (a GPU/CPU data-plane process), `drain` one."""
    if ctx.invoked_subcommand is None:  # the old spelling `flockserve worker [OPTIONS]`
        sys.stderr.write("flockserve: `flockserve worker` is deprecated, use `flockserve worker run`\n")
        _run_worker(partitions, device)


@worker_app.command("run")
def worker_run(partitions: Partitions = None, device: Device = None) -> None:
    """Run a GPU/CPU worker: consume requests, batch many tenants per forward pass, reply."""
    _run_worker(partitions, device)


@worker_app.command("drain")
def worker_drain(worker_id: str,
                 undo: Annotated[bool, typer.Option("--undo", help="Accept partitions again.")] = False,
                 as_json: JsonFlag = False) -> None:
    """Move every partition off WORKER_ID by warm hand-over (the manager carries it out); the
    worker keeps running, ready to be stopped once it holds no lease."""
    from workers.config import settings
    from schema.tables import WorkerState
    from workers.manager.admin import drain

    state = run_cli(lambda: asyncio.run(drain(settings(), worker_id, undo=undo)))
    if as_json:
        print_json({"worker_id": worker_id, "state": state})
    else:
        out.print(f"worker {worker_id}: {state}" + (" (partitions move as the manager hands them over)"
                                                     if state == WorkerState.DRAINING else ""))
