"""`flockserve` command line: database migrations, topics, tenants and adapters.

Human tables by default, ``--json`` for scripts. Bad input ends with a one-line ``error: ...``
on stderr and exit code 1 (usage errors: 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Flock: many tenant-customised BERT encoders on one shared base model.")
db_app = typer.Typer(no_args_is_help=True, help="Database migrations (Alembic).")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants.")
adapter_app = typer.Typer(no_args_is_help=True, help="Tenant adapters (PET deltas + heads).")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
# `flockserve worker` runs a worker (the callback); `flockserve worker drain ID` is a subcommand.
worker_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                         help="Run a GPU/CPU worker: consume requests, batch many tenants per forward pass, reply. "
                              "Subcommands manage workers.")
app.add_typer(worker_app, name="worker")
app.add_typer(db_app, name="db")
app.add_typer(tenant_app, name="tenant")
app.add_typer(adapter_app, name="adapter")
app.add_typer(topics_app, name="topics")

out = Console()
err = Console(stderr=True)
JSON_OPT = typer.Option(False, "--json", help="Machine-readable JSON output.")


class CliError(Exception):
    """Expected failure: printed as one line, exit code 1."""


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def emit(rows: Sequence[Any] | Any, as_json: bool, columns: Sequence[str], title: str | None = None) -> None:
    """Print dataclass rows as a rich table, or as JSON (a list, or one object)."""
    if as_json:
        out.print_json(json.dumps(_plain(rows)))
        return
    rows = rows if isinstance(rows, (list, tuple)) else [rows]
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        d = _plain(r)
        table.add_row(*("" if d.get(c) is None else str(d.get(c)) for c in columns))
    out.print(table)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message: str) -> None:
    """One line on stderr, never wrapped (scripts parse it), then exit 1 (raised by the caller)."""
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")
    sys.stderr.flush()


def run_cli(fn: Callable[[], Any]) -> Any:
    """Turn the typed errors of the lower layers into one line and exit 1."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from workers.adapters.store import StoreError
    from workers.adapters.validate import AdapterRejected
    from workers.manager.errors import ControlPlaneError
    from workers.models import ModelNotFound

    try:
        return fn()
    except (CliError, StoreError, AdapterRejected, ModelNotFound, ControlPlaneError) as exc:
        fail(str(exc))
    except OperationalError as exc:
        fail(f"database unreachable: {_first_line(exc.orig)}")
    except ProgrammingError as exc:
        fail(f"database not migrated? run `flockserve db upgrade` ({_first_line(exc.orig)})")
    raise typer.Exit(1)


def _sessions():
    from workers.db import session_factory
    return session_factory()


def _store():
    from workers.adapters.store import AdapterStore, make_backend
    from workers.config import settings
    s = settings()
    return AdapterStore(_sessions(), make_backend(s.store_backend, s.store_dir),
                        max_bytes=s.max_adapter_bytes, models_dir=s.models_dir)


# ---------------------------------------------------------------- db
@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from workers import migrate
    run_cli(lambda: migrate.upgrade(revision))
    db_current(as_json=False)


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument("-1")) -> None:
    """Migrate the database down to REVISION (default: one step; 'base' for empty)."""
    from workers import migrate
    run_cli(lambda: migrate.downgrade(revision))
    db_current(as_json=False)


@db_app.command("current")
def db_current(as_json: bool = JSON_OPT) -> None:
    """Show the database's revision and this code's head."""
    from workers import migrate
    cur, head = run_cli(migrate.current)
    info = {"current": cur, "head": head, "up_to_date": cur == head}
    if as_json:
        out.print_json(json.dumps(info))
    else:
        out.print(f"database at {cur or '(empty)'}; code head {head}"
                  + ("" if cur == head else "  [yellow]-> run `flockserve db upgrade`[/]"))


# ---------------------------------------------------------------- topics
@topics_app.command("create")
def topics_create(partitions: Optional[int] = typer.Option(None, help="Request-topic partitions."),
                  as_json: bool = JSON_OPT) -> None:
    """Create Flock's topics if missing (idempotent) and show their partition counts."""
    from workers.config import settings
    from workers.kafka_admin import ensure_topics, topic_plan

    s = settings()

    def go():
        try:
            return asyncio.run(ensure_topics(s.kafka_bootstrap, topic_plan(partitions or s.request_partitions)))
        except Exception as exc:  # aiokafka raises a zoo of connection errors
            raise CliError(f"kafka at {s.kafka_bootstrap}: {type(exc).__name__}: {exc}") from None

    counts = run_cli(go)
    rows = [{"topic": t, "partitions": n} for t, n in sorted(counts.items())]
    emit(rows, as_json, ["topic", "partitions"], title="topics")


# ---------------------------------------------------------------- tenants
TENANT_COLS = ["tenant_id", "display_name", "active_version", "pet_type", "adapters", "created_at"]


@tenant_app.command("create")
def tenant_create(tenant_id: str, name: Optional[str] = typer.Option(None, "--name", help="Display name."),
                  as_json: bool = JSON_OPT) -> None:
    """Register a tenant."""
    from workers.tenants import TenantRegistry
    emit(run_cli(lambda: TenantRegistry(_sessions()).create(tenant_id, name)), as_json, TENANT_COLS)


@tenant_app.command("list")
def tenant_list(as_json: bool = JSON_OPT) -> None:
    """List tenants."""
    from workers.tenants import TenantRegistry
    emit(run_cli(lambda: TenantRegistry(_sessions()).list()), as_json, TENANT_COLS, title="tenants")


@tenant_app.command("show")
def tenant_show(tenant_id: str, as_json: bool = JSON_OPT) -> None:
    """Show one tenant and its adapter versions."""
    from workers.tenants import TenantRegistry

    def go():
        return TenantRegistry(_sessions()).show(tenant_id), _store().list(tenant_id)

    info, adapters = run_cli(go)
    serving = _tenant_serving(tenant_id)
    if as_json:
        out.print_json(json.dumps({**_plain(info), "adapter_versions": _plain(adapters), "serving": serving}))
        return
    emit(info, False, TENANT_COLS)
    if adapters:
        emit(adapters, False, ADAPTER_COLS, title=f"adapters of {tenant_id}")
    if serving.get("error"):
        out.print(f"served: unknown ({serving['error']})")
        return
    emit(serving["partitions"], False, ["partition", "worker_id", "tokens_per_s"],
         title=f"served on ({'spread' if serving['spread'] else 'home partition ' + str(serving['home_partition'])}"
               f"; resident on {', '.join(serving['resident_on']) or 'no worker'})")


def _tenant_serving(tenant_id: str) -> dict:
    """Where the tenant is served; a control-plane problem must not hide the tenant itself."""
    from workers.config import settings
    from workers.manager.pg import DB_ERRORS
    from workers.manager.status import tenant_serving
    try:
        return asyncio.run(tenant_serving(settings(), tenant_id))
    except DB_ERRORS as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


@tenant_app.command("delete")
def tenant_delete(tenant_id: str, yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
                  as_json: bool = JSON_OPT) -> None:
    """Delete a tenant with all its adapter versions."""
    from workers.tenants import TenantRegistry
    if not yes and sys.stdin.isatty():
        typer.confirm(f"delete tenant {tenant_id} and all its adapters?", abort=True)

    def go():
        TenantRegistry(_sessions()).delete(tenant_id)
        return _store().collect_garbage()

    freed = run_cli(go)
    if as_json:
        out.print_json(json.dumps({"deleted": tenant_id, "blobs_freed": freed}))
    else:
        out.print(f"deleted tenant {tenant_id} ({freed} unreferenced blobs freed)")


# ---------------------------------------------------------------- adapters
ADAPTER_COLS = ["tenant_id", "version", "pet_type", "base_model_id", "size_bytes", "sha256", "status", "created_at"]


@adapter_app.command("import")
def adapter_import(tenant_id: str, directory: Path,
                   base_model: Optional[str] = typer.Option(None, help="Base model id (default FLOCK_DEFAULT_BASE_MODEL)."),
                   labels: Optional[str] = typer.Option(None, help="Comma-separated label names."),
                   pooling: Optional[str] = typer.Option(None, help="seq_cls pooling: pooler | cls | mean."),
                   activate: bool = typer.Option(True, help="Serve this version right away."),
                   as_json: bool = JSON_OPT) -> None:
    """Import an adapter directory (PEFT or Flock-native) as the tenant's next version."""
    from workers.adapters.importers import read_adapter_dir
    from workers.config import settings

    s = settings()

    def go():
        imp = read_adapter_dir(directory, labels=labels.split(",") if labels else None, pooling=pooling,
                               max_bytes=s.max_adapter_bytes)
        return _store().import_tensors(tenant_id, imp.pet_type, imp.config, imp.tensors,
                                       base_model or s.default_base_model, activate=activate)

    rec = run_cli(go)
    emit(rec, as_json, ADAPTER_COLS)


@adapter_app.command("list")
def adapter_list(tenant: Optional[str] = typer.Option(None, help="Only this tenant."), as_json: bool = JSON_OPT) -> None:
    """List adapter versions."""
    emit(run_cli(lambda: _store().list(tenant)), as_json, ADAPTER_COLS, title="adapters")


# ---------------------------------------------------------------- data plane
@worker_app.callback()
def worker_cmd(ctx: typer.Context,
               partitions: Optional[str] = typer.Option(None, help='Request partitions: "all", "0,2-5", or "leases" '
                                                                  '(follow the manager).'),
               device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N")) -> None:
    """Run a GPU/CPU worker: consume requests, batch many tenants per forward pass, reply."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.config import Settings
    from workers.serving.main import main as worker_main

    over = {k: v for k, v in {"partitions": partitions, "device": device}.items() if v is not None}
    worker_main(Settings(**over))


@worker_app.command("drain")
def worker_drain(worker_id: str, undo: bool = typer.Option(False, "--undo", help="Accept partitions again."),
                 as_json: bool = JSON_OPT) -> None:
    """Move every partition off WORKER_ID by warm hand-over (the manager carries it out); the
    worker keeps running, ready to be stopped once it holds no lease."""
    from workers.config import settings
    from workers.manager import leases, pg
    from workers.manager.errors import UnknownWorker

    async def go():
        conn = await pg.connect(settings().database_url, "flock-cli")
        try:
            if not await leases.set_worker_state(conn, worker_id, "serving" if undo else "draining"):
                raise UnknownWorker(f"worker {worker_id!r} is not registered")
            await leases.audit(conn, "worker.undrain" if undo else "worker.drain", worker_id, {})
            await pg.notify(conn, settings().requests_topic)
        finally:
            await conn.close()

    run_cli(lambda: asyncio.run(go()))
    res = {"worker_id": worker_id, "state": "serving" if undo else "draining"}
    if as_json:
        out.print_json(json.dumps(res))
    else:
        out.print(f"worker {worker_id}: {res['state']}" + ("" if undo else " (partitions move as the manager hands them over)"))


# ---------------------------------------------------------------- control plane
@app.command("manager")
def manager_cmd() -> None:
    """Run the control plane: leader election, leases, failure take-over, rebalancing, hot-tenant routes."""
    from workers.config import Settings
    from workers.manager.manager import main as manager_main
    manager_main(Settings())


WORKER_STATUS_COLS = ["worker_id", "state", "mode", "device", "capacity", "heartbeat_age_s", "partitions", "load",
                      "tokens_per_s", "queue_depth", "inflight", "resident_tenants", "free_adapter_bytes"]
LEASE_COLS = ["partition", "worker_id", "epoch", "state", "next_worker_id", "expires_in_s", "load", "lag",
              "hot_tenants"]


@app.command("status")
def status_cmd(as_json: bool = JSON_OPT, lag: bool = typer.Option(True, help="Ask Kafka for lag per partition.")) -> None:
    """Workers, leases, lag per partition, load, resident tenants, the leading manager."""
    from workers.config import settings
    from workers.manager.status import gather_status

    st = run_cli(lambda: asyncio.run(gather_status(settings(), with_lag=lag)))
    if as_json:
        out.print_json(json.dumps(st, default=str))
        return
    out.print(f"topic {st['topic']}; manager: {st['leader'] or '[yellow]none leading[/]'}")
    emit(st["workers"], False, WORKER_STATUS_COLS, title="workers")
    emit(st["leases"], False, LEASE_COLS, title="partition leases")
    if st["routes"]:
        emit([{"tenant_id": t, "partitions": p} for t, p in sorted(st["routes"].items())], False,
             ["tenant_id", "partitions"], title="spread tenants")


@app.command("rebalance")
def rebalance_cmd(apply: bool = typer.Option(False, "--apply", help="Start the hand-overs."),
                  plan_only: bool = typer.Option(True, "--plan", help="Only print the plan (default)."),
                  force: bool = typer.Option(False, "--force", help="Ignore threshold and minimum dwell time."),
                  as_json: bool = JSON_OPT) -> None:
    """Print partition moves and the predicted imbalance before/after; --apply carries them out."""
    from workers.config import settings
    from workers.manager import pg
    from workers.manager.manager import apply_plan, plan_now

    s = settings()

    async def go():
        conn = await pg.connect(s.database_url, "flock-cli")
        try:
            plan, _, parts = await plan_now(conn, s, force=force)
            started = await apply_plan(conn, s, plan, parts) if apply else []
            return plan, started
        finally:
            await conn.close()

    plan, started = run_cli(lambda: asyncio.run(go()))
    rows = [{"partition": m.partition, "from": m.source, "to": m.target, "load": round(m.cost, 1),
             "reason": m.reason, "started": (m in started) if apply else None} for m in plan.moves]
    info = {"imbalance_before": round(plan.imbalance_before, 3), "imbalance_after": round(plan.imbalance_after, 3),
            "load_before": {k: round(v, 1) for k, v in plan.load_before.items()},
            "load_after": {k: round(v, 1) for k, v in plan.load_after.items()}, "moves": rows, "applied": apply}
    if as_json:
        out.print_json(json.dumps(info))
        return
    emit(rows, False, ["partition", "from", "to", "load", "reason"] + (["started"] if apply else []), title="moves")
    out.print(f"imbalance (max/mean load) {info['imbalance_before']} -> {info['imbalance_after']} predicted"
              + ("" if apply else "; --apply to carry out"))


def _reply_row(reply) -> dict:
    o = reply.outputs or {}
    return {"request_id": reply.request_id, "tenant_id": reply.tenant_id, "status": reply.status.value,
            "label": o.get("label") or (" ".join(o.get("token_labels", [])) or None),
            "score": round(max(o["scores"]), 4) if o.get("scores") else None,
            "adapter_version": reply.adapter_version, "worker_id": reply.worker_id,
            "total_ms": (reply.timings or {}).get("total_ms"), "error": reply.error_message}


@app.command("send")
def send_cmd(tenant_id: str, text: str, pair: Optional[str] = typer.Option(None, help="Second text segment."),
             timeout: float = typer.Option(30.0, help="Seconds to wait for the reply."),
             as_json: bool = JSON_OPT) -> None:
    """Send one request and print its reply (exit 1 when the reply is an error)."""
    from workers.client import FlockClient, FlockTimeout

    async def go():
        async with FlockClient() as c:
            return await c.infer(tenant_id, text, text_pair=pair, timeout=timeout)

    def run():
        try:
            return asyncio.run(go())
        except FlockTimeout as exc:
            raise CliError(str(exc)) from None

    reply = run_cli(run)
    if as_json:
        out.print_json(json.dumps(_plain(reply.to_wire())))
    else:
        emit(_reply_row(reply), False, ["tenant_id", "status", "label", "score", "adapter_version", "worker_id",
                                        "total_ms", "error"])
    if not reply.ok:
        raise typer.Exit(1)


@app.command("load")
def load_cmd(count: int = typer.Option(1000, help="Requests to send."),
             rate: float = typer.Option(200.0, help="Requests per second (open loop)."),
             tenants: Optional[str] = typer.Option(None, help="Comma-separated tenants (default: all with adapters)."),
             dist: str = typer.Option("uniform", help="uniform | zipf"),
             zipf_s: float = typer.Option(1.1, help="Zipf exponent."),
             min_words: int = typer.Option(4), max_words: int = typer.Option(60),
             timeout: float = typer.Option(60.0), seed: int = typer.Option(0),
             as_json: bool = JSON_OPT) -> None:
    """Generate load and report throughput, latency percentiles and reply statuses."""
    from rich.progress import Progress

    from workers.client import FlockClient
    from workers.loadgen import run_load
    from workers.tenants import TenantRegistry

    names = tenants.split(",") if tenants else [t.tenant_id for t in run_cli(lambda: TenantRegistry(_sessions()).list())
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

    report = asyncio.run(go()).summary()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        emit({k: v for k, v in report.items() if k != "statuses"}, False,
             ["sent", "replied", "timeouts", "duration_s", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "duplicates"],
             title="load")
        out.print("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(report["statuses"].items())))
    if report["timeouts"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
