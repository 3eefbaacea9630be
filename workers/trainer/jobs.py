"""`flockserve trainer`: consume training jobs from ``flock.train``, train, register, reply.

Per job (schema/train.py), in partition order:

  fetched      the row is inserted ``queued`` (prefetched jobs wait there)
  picked up    one UPDATE: attempts + 1, ``running``; a job whose attempts were already used up
               by trainers that died on it is ``failed`` (attempts_exhausted) instead
  training     in a thread (Kafka heartbeats go on); progress written every FLOCK_TRAIN_PROGRESS_S
  outcome      ``succeeded`` (metrics, adapter version; register() is one transaction) or
               ``failed`` (code + reason: invalid data, unknown tenant, bad config, ...)
  reply        to the job's reply_to (default flock.train.replies), awaited until acked
  commit       the offset after the job, only now

So a trainer that dies mid-job leaves the row ``running`` and the offset uncommitted: the job is
redelivered to a trainer of the group and picked up again, at most FLOCK_TRAIN_MAX_ATTEMPTS times.
A redelivered job whose row is already final is answered again from the row (no second training).
An undecodable record with no job id goes to the DLQ. Trainers share partitions through Kafka's
group protocol (FLOCK_TRAINER_GROUP); torch loads only when the first job trains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from schema import topics
from schema.messages import Headers, WireError
from schema.tables import Adapter, Tenant, TrainingJob
from schema.train import FailureCode, JobStatus, TrainJob, TrainReply
from workers.config import settings
from workers.db import sync_engine

log = logging.getLogger("flock.trainer")
JOBS = TrainingJob.__table__
CRASH_ENV = "FLOCK_FAULT_TRAIN_CRASH_AT_STEP"  # fault injection: SIGKILL at this training step


@dataclass
class JobRow:
    """A training_jobs row as `flockserve job list|show` prints it."""

    job_id: str
    tenant_id: str
    state: str
    pet_type: str
    attempts: int
    adapter_version: int | None
    code: str | None
    reason: str | None
    progress: dict[str, Any]
    metrics: dict[str, Any] | None
    spec: dict[str, Any]
    data_source: str
    reply_to: str | None
    trainer_id: str | None
    device: str | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None


class JobFailed(Exception):
    """A job that cannot succeed; ``code`` says which kind (schema/train.py FailureCode)."""

    def __init__(self, code: FailureCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Stopping(Exception):
    """The trainer is shutting down: the running job goes back to ``queued`` (not an attempt)."""


# ---------------------------------------------------------------- the table
class JobTable:
    """training_jobs through SQLAlchemy Core (synchronous: called from the training thread)."""

    def __init__(self, database_url: str | None = None):
        self.database_url = database_url
        self.engine = sync_engine(database_url)

    def get(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as c:
            r = c.execute(select(JOBS).where(JOBS.c.job_id == job_id)).mappings().first()
        return _row(r) if r else None

    def list(self, tenant_id: str | None = None, state: str | None = None, limit: int = 50) -> list[JobRow]:
        q = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.job_id).limit(limit)
        if tenant_id:
            q = q.where(JOBS.c.tenant_id == tenant_id)
        if state:
            q = q.where(JOBS.c.state == state)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q).mappings()]

    def record_queued(self, job: TrainJob) -> None:
        with self.engine.begin() as c:
            c.execute(pg_insert(JOBS).values(**_job_values(job)).on_conflict_do_nothing(index_elements=["job_id"]))

    def pick_up(self, job: TrainJob, trainer_id: str, device: str, max_attempts: int) -> tuple[str, JobRow]:
        """("run" | "done" | "exhausted", row). One transaction holding the row's lock."""
        with self.engine.begin() as c:
            c.execute(pg_insert(JOBS).values(**_job_values(job)).on_conflict_do_nothing(index_elements=["job_id"]))
            r = c.execute(select(JOBS).where(JOBS.c.job_id == job.job_id).with_for_update()).mappings().one()
            if r["state"] in ("succeeded", "failed"):
                return "done", _row(r)
            if r["attempts"] >= max_attempts:
                reason = (f"the trainer stopped {r['attempts']} times while running this job "
                          f"(FLOCK_TRAIN_MAX_ATTEMPTS={max_attempts}); last on {r['trainer_id']}")
                r = c.execute(update(JOBS).where(JOBS.c.job_id == job.job_id).values(
                    state="failed", code=FailureCode.ATTEMPTS_EXHAUSTED.value, reason=reason,
                    updated_at=func.now(), finished_at=func.now()).returning(*JOBS.c)).mappings().one()
                return "exhausted", _row(r)
            r = c.execute(update(JOBS).where(JOBS.c.job_id == job.job_id).values(
                state="running", attempts=JOBS.c.attempts + 1, trainer_id=trainer_id, device=device,
                progress={}, started_at=func.now(), updated_at=func.now()).returning(*JOBS.c)).mappings().one()
            return "run", _row(r)

    def progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(update(JOBS).where(JOBS.c.job_id == job_id, JOBS.c.state == "running")
                      .values(progress=progress, updated_at=func.now()))

    def succeed(self, job_id: str, version: int, metrics: dict[str, Any]) -> JobRow:
        return self._finish(job_id, state="succeeded", adapter_version=version, metrics=metrics)

    def fail(self, job_id: str, code: FailureCode, reason: str) -> JobRow:
        return self._finish(job_id, state="failed", code=code.value, reason=reason)

    def fail_undecodable(self, err: WireError) -> JobRow:
        """A record that is no valid job but names its job id and tenant: recorded as failed."""
        assert err.request_id and err.tenant_id
        with self.engine.begin() as c:
            c.execute(pg_insert(JOBS).values(
                job_id=err.request_id, tenant_id=err.tenant_id, pet_type="?", data_source="", reply_to=err.reply_to,
                state="failed", code=FailureCode.INVALID_JOB.value, reason=err.message,
                finished_at=func.now()).on_conflict_do_nothing(index_elements=["job_id"]))
        row = self.get(err.request_id)
        assert row is not None
        return row

    def requeue(self, job_id: str) -> None:
        """Shut down mid-job: not an attempt, the job waits for the next trainer."""
        with self.engine.begin() as c:
            c.execute(update(JOBS).where(JOBS.c.job_id == job_id, JOBS.c.state == "running").values(
                state="queued", attempts=JOBS.c.attempts - 1, progress={}, updated_at=func.now()))

    def _finish(self, job_id: str, **values: Any) -> JobRow:
        with self.engine.begin() as c:
            r = c.execute(update(JOBS).where(JOBS.c.job_id == job_id).values(
                **values, updated_at=func.now(), finished_at=func.now()).returning(*JOBS.c)).mappings().one()
        return _row(r)


def _job_values(job: TrainJob) -> dict[str, Any]:
    spec = {"config": job.config, "options": job.options}
    if job.validation is not None:
        spec["validation"] = job.data_source("validation")
    return dict(job_id=job.job_id, tenant_id=job.tenant_id, pet_type=job.pet_type, spec=spec,
                data_source=job.data_source(), reply_to=job.reply_to, state="queued")


def _row(r: Any) -> JobRow:
    return JobRow(**{f: r[f] for f in JobRow.__dataclass_fields__})


def reply_from_row(row: JobRow, trainer_id: str | None) -> TrainReply:
    ok = row.state == "succeeded"
    return TrainReply(job_id=row.job_id, tenant_id=row.tenant_id,
                      status=JobStatus.SUCCEEDED if ok else JobStatus.FAILED, attempts=row.attempts,
                      code=None if ok or not row.code else FailureCode(row.code), reason=row.reason,
                      adapter_version=row.adapter_version, metrics=_reply_metrics(row.metrics) if ok else None,
                      trainer_id=trainer_id)


def _reply_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The reply carries the summary; the per-epoch history stays in the row."""
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "history"}


# ---------------------------------------------------------------- running one job
def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def _read_large_object(engine, oid: int, limit: int) -> bytes:
    raw = engine.raw_connection()
    try:
        try:
            lo = raw.lobject(oid, "rb")
        except Exception as exc:  # noqa: BLE001 - psycopg2 says "large object N does not exist"
            raise JobFailed(FailureCode.INVALID_DATA, f"pg-lo://{oid}: {str(exc).strip().splitlines()[0]}") from None
        size = lo.seek(0, 2)
        if size > limit:
            raise JobFailed(FailureCode.INVALID_DATA, f"pg-lo://{oid}: {size} bytes exceeds the limit of {limit}")
        lo.seek(0)
        data = lo.read()
        lo.close()
        raw.commit()
        return data
    finally:
        raw.close()


def load_job_data(part: dict[str, Any], task: str, engine, tmp: Path):
    """A job's ``data`` / ``validation`` map -> Examples (the trainer core's loader checks them)."""
    from workers.trainer.data import MAX_FILE_BYTES, load_examples
    if "rows" in part:
        return load_examples(part["rows"], task=task)
    uri, fmt = part["uri"], part.get("format")
    if uri.startswith("pg-lo://"):
        path = tmp / f"lo-{uri[8:]}.{fmt or 'jsonl'}"
        path.write_bytes(_read_large_object(engine, int(uri[8:]), MAX_FILE_BYTES))
    else:
        path = _local_path(uri)
        if fmt and path.suffix.lower() != f".{fmt}":  # the loader goes by suffix
            link = tmp / f"{path.stem}.{fmt}"
            link.symlink_to(path.resolve())
            path = link
    return load_examples(path, task=task)


def _task(job: TrainJob) -> str:
    if "task" in job.options:
        return job.options["task"]
    rows = job.data.get("rows")
    return "token_cls" if rows and isinstance(rows[0], dict) and "tokens" in rows[0] else "seq_cls"


def base_model_for(engine, tenant_id: str) -> str:
    """The tenant's base: that of its active (else newest) adapter; new tenants get the default."""
    with engine.connect() as c:
        t = c.execute(select(Tenant.active_version).where(Tenant.tenant_id == tenant_id)).first()
        if t is None:
            raise JobFailed(FailureCode.UNKNOWN_TENANT, f"tenant {tenant_id!r} does not exist "
                            "(create it with `flockserve tenant create`)")
        q = select(Adapter.base_model_id).where(Adapter.tenant_id == tenant_id)
        q = q.order_by((Adapter.version == t.active_version).desc(), Adapter.version.desc()).limit(1)
        base = c.execute(q).scalar()
    return base or settings().default_base_model


class _Reporter:
    """The training progress callback: writes the row every ``every_s``, honours stop and the
    crash fault hook (a real SIGKILL at a given step, as a power cut would)."""

    def __init__(self, table: JobTable, job_id: str, every_s: float, stop: Callable[[], bool]):
        self.table, self.job_id, self.every_s, self.stop = table, job_id, every_s, stop
        self.crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
        self.last = 0.0
        self.steps = 0

    def __call__(self, p) -> None:
        self.steps += 1 if p.phase != "eval" else 0
        if self.crash_at and self.steps >= self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.stop():
            raise Stopping()
        now = time.monotonic()
        if now - self.last >= self.every_s or p.phase == "eval" or p.step == p.steps:
            self.last = now
            self.table.progress(self.job_id, {k: v for k, v in vars(p).items() if v is not None})


def run_job(job: TrainJob, table: JobTable, device: str, stop: Callable[[], bool] = lambda: False,
            on_result: Callable[[Any], None] | None = None) -> JobRow:
    """Train and register one picked-up job; write its outcome row and return it. Stopping passes
    through (the caller requeues); every other failure ends as a ``failed`` row."""
    s = settings()
    try:
        from workers.trainer.core import TrainDataError, TrainSpec, register, train
        base = base_model_for(table.engine, job.tenant_id)
        o, task = job.options, _task(job)
        with tempfile.TemporaryDirectory(prefix="flock-job-") as tmp:
            try:
                examples = load_job_data(job.data, task, table.engine, Path(tmp))
                val = load_job_data(job.validation, task, table.engine, Path(tmp)) if job.validation else None
                if o.get("labels"):
                    examples.check_labels(o["labels"])
                    if val is not None:
                        val.check_labels(o["labels"])
            except TrainDataError as exc:
                raise JobFailed(FailureCode.INVALID_DATA, str(exc)) from None
        spec = TrainSpec(pet_type=job.pet_type, pet_config=dict(job.config), task=task, labels=o.get("labels"),
                         device=device, val_examples=val,
                         **{k: o[w] for k, w in (("epochs", "epochs"), ("lr", "learning_rate"),
                                                 ("batch_size", "batch_size"), ("max_length", "max_length"),
                                                 ("seed", "seed"), ("val_split", "val_split"),
                                                 ("patience", "patience")) if w in o})
        if spec.patience == 0:
            spec.patience = None
        reporter = _Reporter(table, job.job_id, s.train_progress_s, stop)
        try:
            result = train(base, examples, spec, progress=reporter, models_dir=s.models_dir)
        except TrainDataError as exc:
            raise JobFailed(FailureCode.INVALID_DATA, str(exc)) from None
        except ValueError as exc:  # a bad spec: PET config, options
            raise JobFailed(FailureCode.INVALID_JOB, str(exc)) from None
        if on_result is not None:
            on_result(result)
        try:
            record = register(result, job.tenant_id, activate=o.get("activate", "yes") == "yes",
                              database_url=table.database_url)
        except ValueError as exc:  # the import checks (AdapterRejected, StoreError) refused it
            raise JobFailed(FailureCode.INVALID_JOB, f"not registered: {exc}") from None
        return table.succeed(job.job_id, record.version, result.metrics)
    except Stopping:
        raise
    except JobFailed as exc:
        return table.fail(job.job_id, exc.code, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a bug or a broken device; the job fails with its name
        log.exception("job %s failed", job.job_id)
        return table.fail(job.job_id, FailureCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:4000])


# ---------------------------------------------------------------- the consumer loop
def reply_topic(tenant_id: str, reply_to: str | None) -> str:
    s = settings()
    if s.tenant_reply_topics:  # only the tenant's own topic (its ACLs keep the outcome private)
        return topics.tenant_reply_topic(tenant_id, s.reply_topic_prefix)
    return reply_to or s.train_replies_topic


class Trainer:
    """The service behind `flockserve trainer`. ``max_jobs``: exit after that many outcomes
    (tests, batch use); ``on_result``: sees each TrainResult before it is registered (tests)."""

    def __init__(self, device: str = "cpu", *, trainer_id: str | None = None, max_jobs: int | None = None,
                 database_url: str | None = None, on_result: Callable[[Any], None] | None = None):
        s = settings()
        self.device = device
        self.trainer_id = trainer_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.max_jobs = max_jobs
        self.table = JobTable(database_url)
        self.on_result = on_result
        self.done = 0
        self.stopping = False
        self.topic, self.group = s.train_topic, s.trainer_group

    def stop(self) -> None:
        self.stopping = True

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from workers.kafka_conn import kafka_options
        s = settings()
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=s.kafka_bootstrap, **kafka_options(),
                                    group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_poll_interval_ms=int(s.train_max_busy_s * 1000),
                                    fetch_max_bytes=64 << 20, max_partition_fetch_bytes=2 << 20)
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, **kafka_options(), acks="all",
                                    enable_idempotence=True, max_request_size=4 << 20)
        await producer.start()
        try:
            await consumer.start()
            log.info("trainer %s consuming %s as group %s on %s", self.trainer_id, self.topic, self.group,
                     self.device)
            while not self.stopping and (self.max_jobs is None or self.done < self.max_jobs):
                batches = await consumer.getmany(timeout_ms=500, max_records=s.train_prefetch)
                records = [r for recs in batches.values() for r in recs]
                decoded = [(r, _decode(r.value)) for r in records]
                await asyncio.to_thread(self._record_queued, [j for _, j in decoded if isinstance(j, TrainJob)])
                for rec, job in decoded:
                    if self.stopping:
                        break
                    reply = await asyncio.to_thread(self._handle, job, rec)
                    if reply is None:  # stopped mid-job: requeued, offset not committed
                        break
                    topic, key, value, headers = reply
                    await producer.send_and_wait(topic, value, key=key, headers=headers)
                    await _commit(consumer, rec)
                    self.done += 1
                    if self.max_jobs is not None and self.done >= self.max_jobs:
                        break
                # Leaving early (stop, max_jobs) leaves later records uncommitted: redelivered.
        finally:
            await consumer.stop()
            await producer.stop()

    def _record_queued(self, jobs: list[TrainJob]) -> None:
        for j in jobs:
            self.table.record_queued(j)

    def _handle(self, job: TrainJob | WireError, rec) -> tuple[str, bytes | None, bytes, list] | None:
        """The outcome of one record as (topic, key, value, headers) to send; None when stopped."""
        s = settings()
        if isinstance(job, WireError):
            if not (job.request_id and job.tenant_id):
                log.warning("undecodable job at %s/%d@%d sent to the DLQ: %s", rec.topic, rec.partition,
                            rec.offset, job.message)
                return s.dlq_topic, rec.key, rec.value or b"", [
                    (Headers.ERROR, job.message.encode()),
                    (Headers.SOURCE, f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
            row = self.table.fail_undecodable(job)
            r = reply_from_row(row, self.trainer_id)
            return reply_topic(row.tenant_id, row.reply_to), row.tenant_id.encode(), r.encode(), r.headers()
        verdict, row = self.table.pick_up(job, self.trainer_id, self.device, s.train_max_attempts)
        if verdict == "run":
            log.info("job %s (tenant %s, %s) attempt %d", job.job_id, job.tenant_id, job.pet_type, row.attempts)
            try:
                row = run_job(job, self.table, self.device, stop=lambda: self.stopping, on_result=self.on_result)
            except Stopping:
                self.table.requeue(job.job_id)
                return None
        log.info("job %s %s%s", job.job_id, row.state, f": {row.reason}" if row.reason else "")
        r = reply_from_row(row, self.trainer_id)
        return reply_topic(job.tenant_id, job.reply_to), job.tenant_id.encode(), r.encode(), r.headers()


def _decode(value: bytes | None) -> TrainJob | WireError:
    try:
        return TrainJob.decode(value)  # type: ignore[arg-type]
    except WireError as e:
        return e


async def _commit(consumer, rec) -> None:
    from aiokafka import TopicPartition
    from aiokafka.errors import CommitFailedError, IllegalStateError
    try:
        await consumer.commit({TopicPartition(rec.topic, rec.partition): rec.offset + 1})
    except (CommitFailedError, IllegalStateError) as exc:
        # The partition moved to another trainer meanwhile: it finds the row final and re-replies.
        log.warning("commit of %s/%d@%d failed: %s", rec.topic, rec.partition, rec.offset, exc)


async def submit(job: TrainJob, bootstrap: str | None = None, topic: str | None = None) -> None:
    """Put one job on the train topic (key = tenant id), awaiting the broker's ack."""
    from aiokafka import AIOKafkaProducer

    from workers.kafka_conn import kafka_options
    s = settings()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap or s.kafka_bootstrap, **kafka_options(), acks="all",
                                enable_idempotence=True, max_request_size=4 << 20)
    await producer.start()
    try:
        await producer.send_and_wait(topic or s.train_topic, job.encode(), key=job.tenant_id.encode(),
                                     headers=job.headers())
    finally:
        await producer.stop()


def serve(device: str = "cpu", max_jobs: int | None = None) -> int:
    """Run a trainer until SIGTERM/SIGINT (the running job is requeued) or ``max_jobs`` outcomes."""
    trainer = Trainer(device, max_jobs=max_jobs)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.stop)
        await trainer.run()

    asyncio.run(main())
    return trainer.done
