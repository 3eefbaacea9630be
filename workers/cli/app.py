"""The root `flockserve` app and what every command module shares: output (tables / --json),
the one-line ``error:`` convention and the typed failures it covers.

Human tables by default, ``--json`` for scripts. Bad input, and any Kafka or database failure,
ends with a one-line ``error: ...`` on stderr and exit code 1 (usage errors: 2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from datetime import datetime
from typing import Annotated, Any, Callable, Sequence

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Flock: many tenant-customised BERT encoders on one shared base model.")

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def group(name: str, help: str, **kw: Any) -> typer.Typer:
    """A command group `flockserve NAME ...`, registered on the root app."""
    sub = typer.Typer(no_args_is_help=True, help=help, **kw)
    app.add_typer(sub, name=name)
    return sub


class CliError(Exception):
    """Expected failure: printed as one line, exit code 1."""


def plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {k: plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def print_json(v: Any) -> None:
    out.print_json(json.dumps(plain(v), default=str))


def emit(rows: Sequence[Any] | Any, as_json: bool, columns: Sequence[str], title: str | None = None) -> None:
    """Print dataclass rows as a rich table, or as JSON (a list, or one object)."""
    if as_json:
        print_json(rows)
        return
    rows = rows if isinstance(rows, (list, tuple)) else [rows]
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        d = plain(r)
        table.add_row(*("" if d.get(c) is None else str(d.get(c)) for c in columns))
    out.print(table)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: first line`` (once: some exceptions already start with their type's name)."""
    line, name = first_line(exc), type(exc).__name__
    return line if line.startswith(name) else f"{name}: {line}"


def fail(message: str) -> None:
    """One line on stderr, never wrapped (scripts parse it), then exit 1 (raised by the caller)."""
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")
    sys.stderr.flush()


def run_cli(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; the typed errors of the lower layers, and Kafka or database failures, become
    one ``error:`` line and exit 1."""
    import asyncpg
    from aiokafka.errors import KafkaError
    from sqlalchemy.exc import DBAPIError, ProgrammingError

    from workers.adapters.store import StoreError
    from workers.adapters.validate import AdapterRejected
    from workers.config import settings
    from workers.manager.errors import ControlPlaneError
    from workers.models import ModelNotFound

    # The failure is reported here as one line; the libraries' own log lines about it (aiokafka's
    # "Unable connect", asyncio's "Unclosed AIOKafkaProducer") would break that contract.
    for name in ("aiokafka", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return fn()
    except (CliError, StoreError, AdapterRejected, ModelNotFound, ControlPlaneError) as exc:
        fail(str(exc))
    except ProgrammingError as exc:
        fail(f"database not migrated? run `flockserve db upgrade` ({first_line(exc.orig)})")
    except DBAPIError as exc:
        fail(f"database unreachable: {first_line(exc.orig)}")
    except KafkaError as exc:  # aiokafka's connection errors
        fail(f"kafka at {settings().kafka_bootstrap}: {describe(exc)}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(f"database: {describe(exc)}")
    except OSError as exc:  # connection refused, timeouts: which service is in the message
        fail(describe(exc))
    raise typer.Exit(1)


def sessions():
    from workers.db import session_factory
    return session_factory()


def store():
    from workers.adapters.store import AdapterStore, make_backend
    from workers.config import settings
    s = settings()
    return AdapterStore(sessions(), make_backend(s.store_backend, s.store_dir),
                        max_bytes=s.max_adapter_bytes, models_dir=s.models_dir)
