"""`flockserve worker run | drain`: the data-plane process and what operators do to workers."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Optional

import typer

from workers.cli.app import JsonFlag, app, fail, out, print_json, run_cli

worker_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                         help="Workers: `run` one (a GPU/CPU data-plane process), `drain` one.")
app.add_typer(worker_app, name="worker")

Partitions = Annotated[Optional[str], typer.Option(help='Request partitions: "all", "0,2-5", or "leases" '
                                                        '(follow the manager).')]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")]
Gpus = Annotated[Optional[str], typer.Option(help='One worker per GPU: "all", a count, or ordinals "0,1" '
                                                  '(FLOCK_GPUS); supervised by this process.')]
Replicas = Annotated[Optional[int], typer.Option(min=1, help="N CPU workers, supervised like --gpus (FLOCK_REPLICAS).")]


def _run_worker(partitions: Optional[str], device: Optional[str], gpus: Optional[str] = None,
                replicas: Optional[int] = None) -> None:
    from workers.config import Settings

    over = {k: v for k, v in {"partitions": partitions, "device": device, "gpus": gpus,
                              "replicas": replicas}.items() if v is not None}
    s = Settings(**over)
    if s.gpus or s.replicas:  # several workers: this process only supervises them
        from workers.serving import supervisor
        if s.device not in ("auto", "cuda" if s.gpus else "cpu"):
            fail(f"--device {s.device} with --{'gpus' if s.gpus else 'replicas'}: each worker's device is set for it")
            raise typer.Exit(2)
        try:
            code = supervisor.main(s, s.gpus or None, s.replicas)
        except ValueError as exc:
            fail(str(exc))
            raise typer.Exit(2)
        raise typer.Exit(code)
    from workers.serving.main import main as worker_main
    worker_main(s)


@worker_app.callback()
def worker_group(ctx: typer.Context, partitions: Partitions = None, device: Device = None) -> None:
    """Workers: `run` one (a GPU/CPU data-plane process), `drain` one."""
    if ctx.invoked_subcommand is None:  # the old spelling `flockserve worker [OPTIONS]`
        sys.stderr.write("flockserve: `flockserve worker` is deprecated, use `flockserve worker run`\n")
        _run_worker(partitions, device)


@worker_app.command("run")
def worker_run(partitions: Partitions = None, device: Device = None, gpus: Gpus = None,
               replicas: Replicas = None) -> None:
    """Run a GPU/CPU worker: consume requests, batch many tenants per forward pass, reply.
    With --gpus (or --replicas), one worker per GPU (or N CPU workers), restarted if they die."""
    _run_worker(partitions, device, gpus, replicas)


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
