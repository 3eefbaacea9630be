"""`flockserve tenant` and `flockserve adapter`: tenants and their adapter versions."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from workers.cli.app import JsonFlag, emit, err, group, out, plain, print_json, run_cli, sessions, store

tenant_app = group("tenant", "Tenants.")
adapter_app = group("adapter", "Tenant adapters (PET deltas + heads).")

TENANT_COLS = ["tenant_id", "display_name", "active_version", "pet_type", "adapters", "created_at"]
ADAPTER_COLS = ["tenant_id", "version", "pet_type", "base_model_id", "size_bytes", "sha256", "status", "created_at"]


# ---------------------------------------------------------------- tenants
@tenant_app.command("create")
def tenant_create(tenant_id: str, name: Annotated[Optional[str], typer.Option("--name", help="Display name.")] = None,
                  as_json: JsonFlag = False) -> None:
    """Register a tenant."""
    from workers.tenants import TenantRegistry
    emit(run_cli(lambda: TenantRegistry(sessions()).create(tenant_id, name)), as_json, TENANT_COLS)


@tenant_app.command("list")
def tenant_list(limit: Annotated[int, typer.Option(min=1, max=10000, help="Tenants per page.")] = 100,
                after: Annotated[Optional[str], typer.Option(help="Start after this tenant id (the previous "
                                                                   "page's next_after).")] = None,
                prefix: Annotated[Optional[str], typer.Option(help="Only ids starting with this.")] = None,
                pet_type: Annotated[Optional[str], typer.Option("--pet-type", help="Only tenants whose active "
                                                                               "adapter is of this PET type.")] = None,
                as_json: JsonFlag = False) -> None:
    """List tenants, a page at a time in id order (stable while tenants come and go)."""
    from workers.tenants import TenantRegistry
    page = run_cli(lambda: TenantRegistry(sessions()).page(limit=limit, after=after, prefix=prefix, pet_type=pet_type))
    if as_json:
        print_json({"tenants": plain(page.tenants), "next_after": page.next_after})
        return
    emit(page.tenants, False, TENANT_COLS, title="tenants")
    if page.next_after:
        out.print(f"more: flockserve tenant list --after {page.next_after}")


@tenant_app.command("import-many")
def tenant_import_many(
        source: Annotated[Path, typer.Argument(help="A directory of adapter directories named by tenant id, "
                                                    "or a JSONL manifest (tenant_id, path, display_name, "
                                                    "base_model, labels, pooling).")],
        base_model: Annotated[Optional[str], typer.Option(help="Base model id where the source names none "
                                                               "(default FLOCK_DEFAULT_BASE_MODEL).")] = None,
        batch: Annotated[int, typer.Option(min=1, help="Tenants per transaction.")] = 500,
        activate: Annotated[bool, typer.Option(help="Serve the imported versions right away.")] = True,
        refusals: Annotated[Optional[Path], typer.Option(help="Write refused tenants and reasons here (JSONL).")] = None,
        as_json: JsonFlag = False) -> None:
    """Register many tenants with their adapters: validated like `adapter import`, committed in
    batches, safe to re-run (unchanged adapters get no new version)."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from workers.adapters.bulk import ManifestError, import_many, read_source
    from workers.cli.app import CliError
    from workers.config import settings

    s = settings()

    def go():
        try:
            items = read_source(source)
        except ManifestError as exc:
            raise CliError(str(exc)) from None
        with Progress(TextColumn("import"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True, disable=as_json) as bar:
            task = bar.add_task("import", total=len(items))
            return import_many(store(), items, default_base_model=base_model or s.default_base_model,
                               activate=activate, batch_size=batch, max_bytes=s.max_adapter_bytes,
                               progress=lambda k: bar.advance(task, k))

    report = run_cli(go)
    if refusals:
        refusals.write_text("".join(json.dumps({"tenant_id": t, "reason": r}) + "\n" for t, r in report.refused))
    summary = {"imported": report.imported, "unchanged": report.unchanged, "refused": len(report.refused),
               "seconds": round(report.seconds, 1), "tenants_per_s": round(report.rate, 1)}
    if as_json:
        print_json({**summary, "refusals": [{"tenant_id": t, "reason": r} for t, r in report.refused]})
    else:
        emit(summary, False, list(summary), title="import-many")
        for t, r in report.refused[:20]:
            err.print(f"refused {t}: {r}", markup=False, highlight=False)
        if len(report.refused) > 20:
            err.print(f"... and {len(report.refused) - 20} more" + (f" (all in {refusals})" if refusals else
                                                                    " (--refusals FILE lists them all)"))
    if report.refused:
        raise typer.Exit(1)


@tenant_app.command("show")
def tenant_show(tenant_id: str, as_json: JsonFlag = False) -> None:
    """Show one tenant and its adapter versions."""
    from workers.tenants import TenantRegistry

    def go():
        return TenantRegistry(sessions()).show(tenant_id), store().list(tenant_id)

    info, adapters = run_cli(go)
    serving = _tenant_serving(tenant_id)
    if as_json:
        print_json({**plain(info), "adapter_versions": adapters, "serving": serving})
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
def tenant_delete(tenant_id: str, yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
                  as_json: JsonFlag = False) -> None:
    """Delete a tenant with all its adapter versions."""
    from workers.tenants import TenantRegistry
    if not yes and sys.stdin.isatty():
        typer.confirm(f"delete tenant {tenant_id} and all its adapters?", abort=True)

    def go():
        TenantRegistry(sessions()).delete(tenant_id)
        return store().collect_garbage()

    freed = run_cli(go)
    if as_json:
        print_json({"deleted": tenant_id, "blobs_freed": freed})
    else:
        out.print(f"deleted tenant {tenant_id} ({freed} unreferenced blobs freed)")


# ---------------------------------------------------------------- adapters
@adapter_app.command("import")
def adapter_import(tenant_id: str, directory: Path,
                   base_model: Annotated[Optional[str], typer.Option(
                       help="Base model id (default FLOCK_DEFAULT_BASE_MODEL).")] = None,
                   labels: Annotated[Optional[str], typer.Option(help="Comma-separated label names.")] = None,
                   pooling: Annotated[Optional[str], typer.Option(help="seq_cls pooling: pooler | cls | mean.")] = None,
                   activate: Annotated[bool, typer.Option(help="Serve this version right away.")] = True,
                   as_json: JsonFlag = False) -> None:
    """Import an adapter directory (PEFT or Flock-native) as the tenant's next version."""
    from workers.adapters.importers import read_adapter_dir
    from workers.config import settings

    s = settings()

    def go():
        imp = read_adapter_dir(directory, labels=labels.split(",") if labels else None, pooling=pooling,
                               max_bytes=s.max_adapter_bytes)
        return store().import_tensors(tenant_id, imp.pet_type, imp.config, imp.tensors,
                                      base_model or s.default_base_model, activate=activate), imp

    rec, imp = run_cli(go)
    emit(rec, as_json, ADAPTER_COLS)
    from workers.models import skipping_note
    note = skipping_note(rec.base_model_id, imp.tensors, s.models_dir)
    if note and not as_json:
        out.print(note, markup=False, highlight=False)


@adapter_app.command("list")
def adapter_list(tenant: Annotated[Optional[str], typer.Option(help="Only this tenant.")] = None,
                 as_json: JsonFlag = False) -> None:
    """List adapter versions."""
    emit(run_cli(lambda: store().list(tenant)), as_json, ADAPTER_COLS, title="adapters")
