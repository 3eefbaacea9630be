"""`flockserve db`: database migrations (Alembic)."""

from __future__ import annotations

from typing import Annotated

import typer

from workers.cli.app import JsonFlag, group, out, print_json, run_cli

db_app = group("db", "Database migrations (Alembic).")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database up to REVISION (default: head)."""
    from workers import migrate
    run_cli(lambda: migrate.upgrade(revision))
    db_current(as_json=False)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "-1") -> None:
    """Migrate the database down to REVISION (default: one step; 'base' for empty)."""
    from workers import migrate
    run_cli(lambda: migrate.downgrade(revision))
    db_current(as_json=False)


@db_app.command("current")
def db_current(as_json: JsonFlag = False) -> None:
    """Show the database's revision and this code's head."""
    from workers import migrate
    cur, head = run_cli(migrate.current)
    info = {"current": cur, "head": head, "up_to_date": cur == head}
    if as_json:
        print_json(info)
    else:
        out.print(f"database at {cur or '(empty)'}; code head {head}"
                  + ("" if cur == head else "  [yellow]-> run `flockserve db upgrade`[/]"))
