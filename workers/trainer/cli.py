"""`flockserve adapter train TENANT DATA`: train a PET delta + head on the tenant's base model,
then register it as the tenant's next adapter version (validated like an import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from workers.cli.app import CliError, JsonFlag, err, out, print_json, run_cli
from workers.cli.tenants import adapter_app


def _ints(v: str | None, what: str) -> list[int] | None:
    if v is None:
        return None
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--{what} must be comma-separated integers") from None


def pet_config_of(pet: str, r: int | None, alpha: float | None, sites: str | None, layers: str | None,
                  bottleneck: int | None, variant: str | None, density: float | None,
                  sparsity: float | None, config: str | None) -> dict:
    """The PET options given on the command line (others: the trainer's defaults)."""
    cfg: dict = {}
    if config:
        try:
            cfg = json.loads(config)
        except json.JSONDecodeError as e:
            raise CliError(f"--config is not JSON: {e.msg}") from None
        if not isinstance(cfg, dict):
            raise CliError("--config must be a JSON object")
    given = {"r": r, "alpha": alpha, "bottleneck": bottleneck, "variant": variant, "density": density,
             "init_sparsity": sparsity}
    cfg.update({k: v for k, v in given.items() if v is not None})
    if sites:
        cfg["sites"] = [s.strip() for s in sites.split(",") if s.strip()]
    if layers:
        cfg["layers"] = _ints(layers, "layers")
    return cfg


@adapter_app.command("train")
def adapter_train(
    tenant_id: str,
    data: Path = typer.Argument(..., help="Training data: .jsonl or .csv (text [+ text_pair] + label; "
                                          "token_cls: tokens + tags)."),
    pet: Annotated[str, typer.Option(help="PET type: lora | adapter | bitfit | ia3 | diff | maskbert.")] = "lora",
    task: Annotated[str, typer.Option(help="seq_cls | token_cls.")] = "seq_cls",
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated label set (default: the data's, sorted).")] = None,
    pooling: Annotated[str, typer.Option(help="seq_cls pooling: mean | cls | pooler.")] = "mean",
    r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha.")] = None,
    sites: Annotated[Optional[str], typer.Option(help="Comma-separated sites (LoRA/IA3/diff/MaskBERT).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layer indices (default: all).")] = None,
    bottleneck: Annotated[Optional[int], typer.Option(help="Adapter bottleneck width.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="Adapter placement: houlsby | pfeiffer.")] = None,
    density: Annotated[Optional[float], typer.Option(help="Diff-pruning: fraction of each weight kept.")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="MaskBERT: initial mask sparsity.")] = None,
    config: Annotated[Optional[str], typer.Option(help="More PET options as a JSON object.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the delta (default per PET type).")] = None,
    head_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the head.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per row (longer rows are truncated).")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (split, init, order).")] = 0,
    val_split: Annotated[float, typer.Option(help="Held-out fraction when no --val file is given.")] = 0.1,
    val: Annotated[Optional[Path], typer.Option(help="Separate validation data (same format).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping: epochs without a better val macro-F1.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
    base_model: Annotated[Optional[str], typer.Option(help="Base model id (default FLOCK_DEFAULT_BASE_MODEL).")] = None,
    metrics: Annotated[Optional[Path], typer.Option(help="Where to write the metrics JSON "
                                                         "(default .flock/train/TENANT-vN.json).")] = None,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="Serve the new version right away.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Train an adapter on DATA and register it as TENANT's next version."""
    from workers.config import settings

    s = settings()

    def go():
        from workers.adapters.store import TenantNotFound
        from workers.trainer.core import TrainSpec, load_examples, register, train
        from workers.trainer.data import TrainDataError

        try:
            ex = load_examples(data, task)
            val_ex = load_examples(val, task) if val is not None else None
        except TrainDataError as e:
            raise CliError(str(e)) from None
        _check_tenant(tenant_id, TenantNotFound)
        spec = TrainSpec(pet_type=pet, task=task, labels=labels.split(",") if labels else None, pooling=pooling,
                         pet_config=pet_config_of(pet, r, alpha, sites, layers, bottleneck, variant, density,
                                                  sparsity, config),
                         epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size, max_length=max_length,
                         seed=seed, val_split=val_split, val_examples=val_ex, patience=patience, device=device)
        try:
            with _Bar(as_json) as bar:
                result = train(base_model or s.default_base_model, ex, spec, progress=bar.update,
                               models_dir=s.models_dir)
        except (TrainDataError, ValueError) as e:
            raise CliError(str(e)) from None
        rec = register(result, tenant_id, activate=activate)
        return result, rec

    result, rec = run_cli(go)
    path = metrics or (s.store_dir.parent / "train" / f"{tenant_id}-v{rec.version}.json")
    doc = {"tenant_id": tenant_id, "version": rec.version, "active": activate, "pet_type": rec.pet_type,
           "base_model_id": rec.base_model_id, "config": rec.config, "size_bytes": rec.size_bytes,
           "sha256": rec.sha256, **result.metrics}
    from workers.models import skipping_note
    note = skipping_note(rec.base_model_id, result.tensors, s.models_dir)
    if note:
        doc["lower_layer_skipping"] = note
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    doc["metrics_path"] = str(path)
    if as_json:
        print_json(doc)
        return
    table = Table(title=f"{tenant_id} v{rec.version} ({rec.pet_type}, {result.metrics['val_rows']} held-out rows)")
    for c in ("label", "support", "predicted", "correct"):
        table.add_column(c, justify="left" if c == "label" else "right")
    for name, c in result.metrics["per_label"].items():
        table.add_row(name, str(c["support"]), str(c["predicted"]), str(c["correct"]))
    out.print(table)
    m = result.metrics
    out.print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  epochs {m['epochs_run']} "
              f"(best {m['best_epoch']})  {m['seconds']:.1f} s  {rec.size_bytes} bytes  "
              f"{'active' if activate else 'not activated'}  metrics: {path}", markup=False, highlight=False)
    if note:
        out.print(note, markup=False, highlight=False)


def _check_tenant(tenant_id: str, not_found) -> None:
    """Fail before training, not after, when the tenant does not exist."""
    from schema.tables import Tenant
    from workers.cli.app import sessions

    with sessions()() as s:
        if s.get(Tenant, tenant_id) is None:
            raise not_found(f"tenant {tenant_id!r} does not exist")


class _Bar:
    """Rich progress on stderr: step, loss, and the validation metric after each epoch."""

    def __init__(self, quiet: bool):
        self.quiet, self.task, self.val = quiet, None, ""

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err)
            self.p.__enter__()
        return self

    def update(self, ev) -> None:
        if self.quiet:
            return
        if self.task is None or self.phase != ev.phase:
            self.phase = ev.phase
            self.task = self.p.add_task(ev.phase, total=ev.steps, info="")
        if ev.val_macro_f1 is not None:
            self.val = f"val acc {ev.val_accuracy:.3f} F1 {ev.val_macro_f1:.3f}"
        loss = f"loss {ev.loss:.4f}" if ev.loss is not None else ""
        self.p.update(self.task, completed=ev.step, description=f"{ev.phase} epoch {ev.epoch}/{ev.epochs}",
                      info=f"{loss}  {self.val}")

    def __exit__(self, *a):
        if not self.quiet:
            self.p.__exit__(*a)
        return False
