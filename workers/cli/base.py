"""``flockserve base``: derived bases from a base model and an unlabelled corpus: ``build-plot`` (a
lower-layer skipping base) and ``build-fp8`` (an FP8 base)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from workers.cli.app import CliError, JsonFlag, emit, group, run_cli

base_app = group("base", "Base models: derived lower-layer skipping and FP8 bases.")


@base_app.command("build-plot")
def build_plot(base: Annotated[str, typer.Argument(help="Base model id or checkpoint directory.")],
               skip: Annotated[int, typer.Option("--skip", help="K: lower layers the table replaces.")],
               corpus: Annotated[List[str], typer.Option("--corpus", help="Text (one per line) or JSONL "
                                                         "(`text`) files; repeat or list after it.")],
               extra: Annotated[Optional[List[str]], typer.Argument(help="More corpus files.")] = None,
               out_id: Annotated[Optional[str], typer.Option(help="New base id (default BASE-plotK), a "
                                                              "directory under FLOCK_MODELS_DIR.")] = None,
               epochs: int = 1, batch_size: int = 32, max_length: int = 128, lr: float = 1e-4,
               max_steps: Annotated[Optional[int], typer.Option(help="Cap on distillation steps.")] = None,
               max_entries: Annotated[int, typer.Option(help="Table rows kept, most frequent first.")] = 2_000_000,
               ckpt_every: int = 200,
               device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
               quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
               as_json: JsonFlag = False) -> None:
    """Distil the shallow part (lower K layers on tri-gram windows, gate, second position
    embedding, LayerNorm) to match the full model's layer-K and final states on the corpus, then
    tabulate the corpus's tri-grams. Resumable: rerun the same command after an interruption."""
    def go():
        from workers.config import settings
        from workers.engine.plot.build import DistilSpec, build_skipping_base
        from workers.models import base_dims, resolve_model_dir
        s = settings()
        base_dir = resolve_model_dir(base, s.models_dir)
        dims = base_dims(base, s.models_dir)
        if not 1 <= skip < dims.layers:
            raise CliError(f"--skip must be in 1..{dims.layers - 1} for {base} ({dims.layers} layers)")
        name = out_id or f"{Path(base).name}-plot{skip}"
        out = Path(s.models_dir) / name
        spec = DistilSpec(skip=skip, epochs=epochs, batch_size=batch_size, max_length=max_length, lr=lr,
                          max_steps=max_steps, max_entries=max_entries, ckpt_every=ckpt_every, device=device)
        try:
            with _Bars(quiet or as_json) as bars:
                res = build_skipping_base(base, str(base_dir), out, list(corpus) + list(extra or []), spec, bars.update)
        except (FileNotFoundError, ValueError, UnicodeError) as e:
            raise CliError(str(e)) from e
        res["id"] = name
        emit(res, as_json, ["id", "skip", "texts", "steps", "loss_last", "table_rows", "table_bytes", "out"],
             title="skipping base")
    run_cli(go)


@base_app.command("build-fp8")
def build_fp8(base: Annotated[str, typer.Argument(help="Base model id or checkpoint directory.")],
              corpus: Annotated[List[str], typer.Option("--corpus", help="Text (one per line) or JSONL "
                                                        "(`text`) files for calibration; repeat or list after it.")],
              extra: Annotated[Optional[List[str]], typer.Argument(help="More corpus files.")] = None,
              out_id: Annotated[Optional[str], typer.Option(help="New base id (default BASE-fp8), a "
                                                             "directory under FLOCK_MODELS_DIR.")] = None,
              max_texts: Annotated[int, typer.Option(help="Calibration texts used (first N).")] = 4096,
              batch_size: int = 64, max_length: int = 128,
              device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
              quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
              as_json: JsonFlag = False) -> None:
    """Calibrate static FP8 (e4m3) scales for every shared GEMM input on the corpus (fp32 pass
    of the plain base) and write an FP8 base: workers serving it run the shared GEMMs in FP8 on
    GPUs that have FP8 tensor cores (emulated elsewhere); tenants' deltas stay in bf16."""
    def go():
        from workers.config import settings
        from workers.engine.fp8 import build_fp8_base
        from workers.models import resolve_model_dir
        s = settings()
        base_dir = resolve_model_dir(base, s.models_dir)
        name = out_id or f"{Path(base).name}-fp8"
        out = Path(s.models_dir) / name
        if max_texts < 1 or batch_size < 1:
            raise CliError("--max-texts and --batch-size must be at least 1")
        try:
            with _Bars(quiet or as_json) as bars:
                res = build_fp8_base(base, str(base_dir), out, list(corpus) + list(extra or []), max_texts,
                                     max_length, batch_size, device, bars.update)
        except (FileNotFoundError, ValueError, UnicodeError) as e:
            raise CliError(str(e)) from e
        res["id"] = name
        emit(res, as_json, ["id", "texts", "amax_min", "amax_max", "out"], title="FP8 base")
    run_cli(go)


class _Bars:
    """One rich progress bar per phase (distil, table)."""

    def __init__(self, quiet: bool):
        self.quiet, self.tasks = quiet, {}

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.p.start()
        return self

    def update(self, phase: str, done: int, total: int, info: dict) -> None:
        if self.quiet:
            return
        if phase not in self.tasks:
            self.tasks[phase] = self.p.add_task(phase, total=total, info="")
        text = " ".join(f"{k} {v:.4g}" for k, v in info.items())
        self.p.update(self.tasks[phase], completed=done, total=total, info=text)

    def __exit__(self, *a):
        if not self.quiet:
            self.p.stop()
