"""`flockserve trainer` (consume training jobs) and `flockserve job submit|list|show`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from workers.cli.app import CliError, JsonFlag, app, emit, fail, group, out, plain, print_json, run_cli

job_app = group("job", "Training jobs from the flock.train topic (`flockserve trainer` runs them).")

LIST_COLS = ["job_id", "tenant_id", "state", "pet", "tries", "ver", "detail"]
FINAL = ("succeeded", "failed")


@app.command("trainer")
def trainer(device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N (where jobs train)")] = "cpu",
            max_jobs: Annotated[Optional[int], typer.Option("--max-jobs", help="Exit after this many jobs.")] = None,
            ) -> None:
    """Run a trainer: consume jobs from flock.train, train on DEVICE, record them, reply."""
    from workers.trainer.jobs import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_cli(lambda: serve(device, max_jobs))


def _detail(r: Any) -> str:
    """One short cell (the list fits 80 columns): progress while running, accuracy / macro-F1
    when done, the failure code when failed (`job show` has the reason)."""
    if r.state == "running" and r.progress:
        p = r.progress
        s = f"ep {p.get('epoch', '?')}/{p.get('epochs', '?')} {p.get('step', '?')}/{p.get('steps', '?')}"
        return s + (f" L{p['loss']:.2f}" if isinstance(p.get("loss"), (int, float)) else "")
    if r.state == "succeeded" and r.metrics:
        acc, f1 = r.metrics.get("accuracy"), r.metrics.get("macro_f1")
        return f"acc {acc:.2f} F1 {f1:.2f}" if isinstance(acc, float) and isinstance(f1, float) else ""
    if r.state == "failed":
        return r.code or "failed"
    return ""


def _summary(r: Any) -> dict[str, Any]:
    return {"job_id": r.job_id, "tenant_id": r.tenant_id, "state": r.state, "pet": r.pet_type, "tries": r.attempts,
            "ver": r.adapter_version, "detail": _detail(r)}


@job_app.command("list")
def job_list(tenant: Annotated[Optional[str], typer.Option(help="Only this tenant's jobs.")] = None,
             state: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed")] = None,
             limit: Annotated[int, typer.Option(min=1, max=10000)] = 50, as_json: JsonFlag = False) -> None:
    """Training jobs, newest first."""
    from schema.tables import JOB_STATES
    from workers.trainer.jobs import JobTable
    if state is not None and state not in JOB_STATES:
        fail(f"--state must be one of {', '.join(JOB_STATES)}")
        raise typer.Exit(1)
    rows = run_cli(lambda: JobTable().list(tenant, state, limit))
    if as_json:
        print_json(rows)
    else:
        emit([_summary(r) for r in rows], False, LIST_COLS, title="training jobs")


@job_app.command("show")
def job_show(job_id: str, as_json: JsonFlag = False) -> None:
    """One job: its state, attempts, progress, metrics or failure reason."""
    from workers.trainer.jobs import JobTable

    def go():
        row = JobTable().get(job_id)
        if row is None:
            raise CliError(f"no training job {job_id!r}")
        return row

    row = run_cli(go)
    if as_json:
        print_json(row)
        return
    d = plain(row)
    for k in ("progress", "metrics", "spec"):
        d[k] = json.dumps(d[k], separators=(",", ":"), default=str) if d[k] else None
    if d["metrics"] and len(d["metrics"]) > 300:
        d["metrics"] = json.dumps({k: v for k, v in row.metrics.items() if k != "history"},
                                  separators=(",", ":"), default=str)
    emit([{"field": k, "value": v} for k, v in d.items() if v not in (None, "")], False, ["field", "value"],
         title=f"job {job_id}")


@job_app.command("submit")
def job_submit(tenant_id: str,
               data: Annotated[str, typer.Argument(help="JSONL/CSV path (the trainer reads it) or pg-lo://OID")],
               pet_type: Annotated[str, typer.Option("--pet-type", help="lora | adapter | bitfit | ia3 | diff | maskbert")] = "lora",
               config: Annotated[str, typer.Option(help="PET config as JSON, e.g. '{\"r\": 8}'")] = "{}",
               epochs: Annotated[Optional[int], typer.Option()] = None,
               lr: Annotated[Optional[float], typer.Option("--lr")] = None,
               batch_size: Annotated[Optional[int], typer.Option()] = None,
               max_length: Annotated[Optional[int], typer.Option()] = None,
               seed: Annotated[Optional[int], typer.Option()] = None,
               val_split: Annotated[Optional[float], typer.Option()] = None,
               inline: Annotated[bool, typer.Option(help="Send the rows inside the job (small sets).")] = False,
               job_id: Annotated[Optional[str], typer.Option(help="Default: a new UUID.")] = None,
               reply_to: Annotated[Optional[str], typer.Option(help="Outcome topic.")] = None,
               wait: Annotated[bool, typer.Option(help="Wait for the outcome and show it.")] = False,
               timeout: Annotated[float, typer.Option(help="--wait: seconds.")] = 1800.0,
               as_json: JsonFlag = False) -> None:
    """Put one training job on flock.train (keyed by tenant)."""
    from schema.messages import WireError
    from schema.train import TrainJob
    from workers.trainer.jobs import JobTable, submit

    def build() -> TrainJob:
        try:
            cfg = json.loads(config)
        except json.JSONDecodeError as exc:
            raise CliError(f"--config is not JSON: {exc.msg}") from None
        opts = {k: v for k, v in (("epochs", epochs), ("learning_rate", lr), ("batch_size", batch_size),
                                  ("max_length", max_length), ("seed", seed), ("val_split", val_split))
                if v is not None}
        if data.startswith("pg-lo://"):
            part: dict[str, Any] = {"uri": data}
        elif inline:
            from workers.trainer.data import TrainDataError, load_examples
            try:
                part = {"rows": load_examples(data, task="token_cls" if _is_token_data(data) else "seq_cls").to_rows()}
            except TrainDataError as exc:
                raise CliError(str(exc)) from None
        else:
            p = Path(data).resolve()
            if not p.is_file():
                raise CliError(f"{data}: no such file")
            part = {"uri": f"file://{p}"}
        job = TrainJob(job_id=job_id or str(uuid.uuid4()), tenant_id=tenant_id, pet_type=pet_type, config=cfg,
                       options=opts, data=part, reply_to=reply_to)
        try:
            job.encode()
        except WireError as exc:
            raise CliError(exc.message) from None
        return job

    job = run_cli(build)
    run_cli(lambda: asyncio.run(submit(job)))
    if not wait:
        if as_json:
            print_json({"job_id": job.job_id, "tenant_id": job.tenant_id, "state": "submitted"})
        else:
            out.print(f"submitted job {job.job_id} for {job.tenant_id}")
        return
    table = run_cli(JobTable)
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = run_cli(lambda: table.get(job.job_id))
        if row is not None and row.state in FINAL:
            break
        time.sleep(1.0)
    if row is None or row.state not in FINAL:
        fail(f"job {job.job_id} not finished after {timeout:.0f} s (state: {row.state if row else 'not picked up'}); "
             "is `flockserve trainer` running?")
        raise typer.Exit(1)
    if as_json:
        print_json(row)
    else:
        emit([_summary(row)], False, LIST_COLS)
    if row.state == "failed":
        raise typer.Exit(1)


def _is_token_data(path: str) -> bool:
    first = Path(path).read_text(encoding="utf-8").lstrip().splitlines()[:1]
    return bool(first) and ('"tokens"' in first[0] or first[0].split(",")[0].strip() == "tokens")
