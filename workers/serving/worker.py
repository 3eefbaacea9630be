"""The Kafka data plane of one worker: consume -> decode -> tokenise -> batch -> engine -> reply
-> commit. Knows nothing of CUDA: the engine is reached through ``submit/prefetch/invalidate``.

Delivery: at-least-once. Each consumed offset is tracked until every record it causes (reply
and/or DLQ record) is acked by Kafka; per partition only the contiguous done prefix is
committed. A crash therefore replays unfinished requests (duplicates carry the same
request_id) and never drops one.

Ownership and fencing live in :mod:`workers.serving.ownership` (static partitions or the
manager's leases; a lapsed lease stops consumption and commits); reply sending and acks in
:mod:`workers.serving.sender`. A control-plane agent hands in the current leases
(``set_leases``) and asks for hand-overs (``release_partition``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from time import thread_time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from schema.messages import ErrorCode, Headers, InferReply, InferRequest, WireError, encode_replies
from workers.auth import WRONG_TENANT, KeyRow, Keyring, Unanswered
from workers.serving.batcher import BatchPolicy, CoordinatedBatcher, Pending
from workers.serving.fault_hooks import CrashPoints
from workers.serving.versions import follow_active_versions
from workers.serving.metrics import WorkerMetrics
from workers.serving.offsets import OffsetTracker
from workers.serving.ownership import PartitionOwnership
from workers.serving.replies import dlq_headers, reply_for_output
from workers.serving.sender import ReplySender, Work

log = logging.getLogger("flock.worker")


def kafka_extensions() -> dict[str, str]:
    """Are aiokafka's Cython record codecs in use? It falls back to pure Python silently when they
    do not import (or with AIOKAFKA_NO_EXTENSIONS set)."""
    import aiokafka
    from aiokafka.record import default_records
    c = default_records.DefaultRecordBatchBuilder.__module__.startswith("aiokafka.record._crecords")
    return {"aiokafka": aiokafka.__version__, "c_extensions": "yes" if c else "no"}


class EngineAPI(Protocol):
    def submit(self, batch: Any) -> Any: ...  # -> concurrent.futures.Future[list[RequestOutput]]
    def prefetch(self, tenant_ids: list[str]) -> Any: ...
    def invalidate(self, tenant_id: str) -> None: ...


class TokenizerAPI(Protocol):
    def ids(self, items: list[InferRequest], max_len: int) -> list[tuple[list[int], list[int] | None]]: ...
    def pack(self, pending: list["Work"]) -> Any: ...
    vocab_size: int


@dataclass
class WorkerConfig:
    worker_id: str
    bootstrap: str
    requests_topic: str
    replies_topic: str
    dlq_topic: str
    group_id: str
    partitions: list[int]
    max_seq_len: int = 512
    truncate: bool = False
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    inflight_batches: int = 2
    high_water: int = 2000
    low_water: int = 500
    commit_interval_ms: int = 200
    version_poll_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    follow_leases: bool = False  # True: own only what set_leases() hands in
    handover_drain_s: float = 10.0
    produce_linger_ms: float = 2.0
    produce_max_batch_bytes: int = 256 * 1024
    fetch_min_bytes: int = 64 * 1024
    fetch_max_wait_ms: int = 5
    idle_dispatch: bool = True  # a batch goes out at once, unfilled, when the engine has nothing in flight
    client_suffix: str = ""  # Kafka client ids: the edge index in a worker group
    kafka: dict[str, Any] = field(default_factory=dict)  # security options (workers.kafka_conn)
    auth_required: bool = False  # requests must be signed with a tenant key (workers.auth)
    auth_keys_poll_s: float = 5.0
    tenant_reply_prefix: str | None = None  # replies to <prefix><tenant>, reply_to only if it is that
    # Refused requests answered (reply + DLQ record) per tenant: a burst, then this many per second;
    # beyond that a flood of forgeries is only counted, so it costs a decode and a check each.
    auth_refusals_burst: int = 20
    auth_refusals_per_s: float = 1.0
    auth_summary_s: float = 10.0  # one DLQ record sums up the refusals not answered in this period


class WorkerLoopError(RuntimeError):
    """One of the worker's loops (intake, batching, commits, ...) raised: the worker stopped."""


class Worker:
    def __init__(self, cfg: WorkerConfig, engine: EngineAPI, tokenizer: TokenizerAPI,
                 metrics: WorkerMetrics | None = None,
                 version_changes: Callable[[], list[tuple[str, int | None]]] | None = None,
                 load_keys: Callable[[], list[KeyRow]] | None = None):
        self.cfg = cfg
        self.engine = engine
        self.tok = tokenizer
        self.metrics = metrics or WorkerMetrics()
        self.version_changes = version_changes
        if cfg.auth_required and load_keys is None:
            raise ValueError("auth_required needs a key loader")
        self.load_keys = load_keys
        self.keyring = Keyring() if cfg.auth_required else None
        self._refusals: dict[str, list[float]] = {}  # tenant -> [tokens, last refill (monotonic)]
        self._refused: dict[str, int] = {}  # reason -> refusals this round (metrics per round)
        self._skipped: dict[int, int] = {}  # partition -> last unanswered refusal of this round
        self._unanswered = Unanswered()
        self._unanswered_seen = 0  # of _unanswered.n, already in the metric
        self.batcher = CoordinatedBatcher(cfg.policy)
        self.tracker = OffsetTracker()
        self.stopping = asyncio.Event()
        self.ready = False
        self.failure: BaseException | None = None  # a loop that died: run() stops and raises it
        self._at_engine = 0  # batches submitted and not yet completed
        self._wake = asyncio.Event()
        self._inflight = asyncio.Semaphore(cfg.inflight_batches)
        self._tasks: set[asyncio.Task] = set()
        self.crash = CrashPoints.from_env()  # fault-injection suite only; inert by default
        self._peak = 0
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flock-tokenize")
        self.ownership = PartitionOwnership(cfg.requests_topic, cfg.partitions, cfg.follow_leases,
                                            forget=self.tracker.forget)
        self.sender: ReplySender | None = None
        self._rounds = 0  # intake iterations, so a release can wait out a fetch already under way
        # Load for the control plane: partition -> tenant -> [requests, tokens] since the last take_load().
        self._load: dict[int, dict[str, list[int]]] = {}
        self._lag: dict[int, int] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    @property
    def owned(self) -> dict[int, int]:
        """partition -> lease epoch (0 in static mode) of what this worker owns now."""
        return self.ownership.owned

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        cfg = self.cfg
        self.producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, **cfg.kafka, enable_idempotence=True, acks="all",
                                         linger_ms=cfg.produce_linger_ms, max_batch_size=cfg.produce_max_batch_bytes,
                                         max_request_size=max(4 << 20, cfg.produce_max_batch_bytes),
                                         request_timeout_ms=30000, client_id=f"flock-worker-{cfg.worker_id}{cfg.client_suffix}")
        self.consumer = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, **cfg.kafka, group_id=cfg.group_id,
                                         enable_auto_commit=False, auto_offset_reset="earliest",
                                         max_partition_fetch_bytes=2 << 20, isolation_level="read_uncommitted",
                                         fetch_min_bytes=cfg.fetch_min_bytes, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
                                         client_id=f"flock-worker-{cfg.worker_id}{cfg.client_suffix}")
        await self.producer.start()
        await self.consumer.start()
        self.sender = ReplySender(self.producer, self.tracker, self.metrics, self.crash, cfg.requests_topic,
                                  cfg.replies_topic, cfg.dlq_topic, tenant_reply_prefix=cfg.tenant_reply_prefix)
        if self.keyring is not None:  # keys before the first request, or every request is refused
            await self._reload_keys(initial=True)
        tps = [TopicPartition(cfg.requests_topic, p) for p in cfg.partitions]
        self.consumer.assign(tps)  # manual assignment: ownership comes from config/manager leases
        self.ownership.consumer = self.consumer
        self.ownership.sync()
        log.info("worker %s consuming %s partitions %s", cfg.worker_id, cfg.requests_topic, cfg.partitions)
        ext = kafka_extensions()
        self.metrics.kafka_info.info(ext)
        log.log(logging.INFO if ext["c_extensions"] == "yes" else logging.WARNING,
                "aiokafka %s record codec: %s", ext["aiokafka"],
                "C extensions" if ext["c_extensions"] == "yes" else "pure Python (8-18x slower per record)")
        self.ready = True
        loops = [self._intake_loop(), self._batch_loop(), self._commit_loop(), self._lag_loop()]
        if self.version_changes is not None:
            loops.append(self._version_loop())
        if self.keyring is not None:
            loops += [self._keys_loop(), self._refusal_summary_loop()]
        runners = [asyncio.create_task(c) for c in loops]
        for t in runners:
            t.add_done_callback(self._loop_ended)
        try:
            await self.stopping.wait()
        finally:
            self.ready = False
            await self._shutdown(runners)
        if self.failure is not None:
            raise WorkerLoopError(f"a worker loop failed: {self.failure!r}") from self.failure

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop that dies would leave the worker holding its partitions while serving nothing
        (ready, heartbeating): stop instead, so that run() raises and whatever runs the worker
        (the edge supervisor, systemd, Kubernetes) restarts it; unanswered requests are replayed."""
        if task.cancelled() or task.exception() is None or self.failure is not None:
            return
        self.failure = task.exception()
        log.error("worker loop %s failed; stopping so that the worker is restarted", task.get_coro().__qualname__,
                  exc_info=self.failure)
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    async def _shutdown(self, runners: list[asyncio.Task]) -> None:
        """Stop fetching, finish what was accepted, flush replies, commit, close."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        try:
            async with asyncio.timeout(self.cfg.shutdown_timeout_s):
                while len(self.batcher) or self._tasks:
                    self._wake.set()
                    await asyncio.sleep(0.02)
                if self.keyring is not None:
                    await self._send_refusal_summary()
                await self.producer.flush()
                while self.tracker.pending() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await self._commit()
        except TimeoutError:
            log.warning("shutdown bound of %.0fs reached with %d requests unreplied; they will be replayed",
                        self.cfg.shutdown_timeout_s, self.tracker.pending())
        for t in runners:
            t.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()
        self._cpu.shutdown(wait=False)
        log.info("worker %s stopped", self.cfg.worker_id)

    # ------------------------------------------------------------ intake
    async def _intake_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            if self.cfg.follow_leases:
                await self.ownership.apply()
            self._rounds += 1
            # One fetch never takes more than a partition's high-water mark: that bounds memory.
            st = self.metrics.stage_cpu
            t0, c0 = thread_time(), st.charged
            records = await self.consumer.getmany(timeout_ms=50, max_records=min(1000, self.cfg.high_water))
            st.add_around_await("consume", t0, c0)
            t0 = thread_time()
            if self.stopping.is_set():
                # Consumed but not accepted: leave them for the next owner (not tracked, not committed).
                break
            good: list[Work] = []
            rejected: list[tuple[Work, list]] = []
            now = time.monotonic()
            track, decode, crash = self.tracker.track, InferRequest.decode, self.crash
            # Not fetchable: lease lost or hand-over began during the fetch; the next owner reads these.
            fetchable = self.ownership.fetchable
            if self.keyring is None:
                batches = [(tp.partition, zip(recs, repeat(None))) for tp, recs in records.items() if fetchable(tp.partition)]
            else:  # tenant signatures first, on the raw bytes (own stage): a forgery is never decoded
                batches = [(tp.partition, self._authenticate(tp.partition, recs, now, rejected))
                           for tp, recs in records.items() if fetchable(tp.partition)]
                t0 = thread_time()
            for p, recs in batches:
                for rec, signer in recs:
                    w = Work(p, rec.offset, now)
                    track(p, rec.offset)
                    crash.on_consumed()
                    try:
                        w.request = decode(rec.value)
                    except WireError as exc:
                        rejected.append((w, self._reject(w, exc, rec)))
                        continue
                    if signer is None or w.request.tenant_id == signer:
                        good.append(w)
                    else:  # signed with a valid key, but of another tenant than the request names
                        self._refuse(p, rec, WRONG_TENANT, now, rejected, w)
            if self.keyring is not None:
                self._count_refusals()
            st.add("decode", t0)
            errors: list[tuple[Work, InferReply]] = []
            if good:
                ids = await loop.run_in_executor(self._cpu, self._tokenise, [w.request for w in good])
                t0 = thread_time()
                now_ms = time.time() * 1000
                for w, (tid, tt) in zip(good, ids):
                    w.token_ids, w.token_type_ids = tid, tt
                    self._admit(w, now_ms, errors)
                self._count_load(good)
                st.add("batch", t0)
            await self.sender.send_records(rejected)
            await self._send_errors(errors)
            self._backpressure()
            self.metrics.queue_depth.set(len(self.batcher))
            pending = self.tracker.pending()
            self.metrics.inflight.set(pending)
            self._peak = max(self._peak, pending)
            self.metrics.inflight_peak.set(self._peak)
            if good:
                self._wake.set()

    def _tokenise(self, reqs: list[InferRequest]) -> list:
        t0 = thread_time()
        try:
            return self.tok.ids(reqs, self.cfg.max_seq_len)
        finally:
            self.metrics.stage_cpu.add_off_loop("tokenise", t0)

    def _admit(self, w: Work, now_ms: float, errors: list[tuple[Work, InferReply]]) -> None:
        """Into the batcher, or a typed error reply (collected in ``errors``, sent per round)."""
        req = w.request
        if not w.token_ids:
            errors.append(self._error(w, ErrorCode.INVALID_INPUT, "empty token_ids"))
        elif len(w.token_ids) > self.cfg.max_seq_len:
            errors.append(self._error(w, ErrorCode.INPUT_TOO_LARGE, f"input has more than {self.cfg.max_seq_len} "
                                      "tokens (set FLOCK_TRUNCATE=1 to truncate)"))
        elif req.token_ids is not None and req.token_ids and max(req.token_ids) >= self.tok.vocab_size:
            errors.append(self._error(w, ErrorCode.INVALID_INPUT,
                                      f"token id outside the vocabulary of {self.tok.vocab_size}"))
        elif req.deadline_ms is not None and req.deadline_ms <= now_ms:
            errors.append(self._error(w, ErrorCode.EXPIRED, "deadline passed before compute"))
        else:
            self.batcher.add(Pending(req.tenant_id, len(w.token_ids), now_ms, req.deadline_ms, payload=w))

    def _reject(self, w: Work, exc: WireError, rec: Any) -> list:
        """The records owed for undecodable input (sent by the caller with others of its round).
        Undecodable input: DLQ record with the original bytes; a typed reply too when the
        reply address could be read."""
        source = f"{self.cfg.requests_topic}/{w.partition}/{w.offset}"
        sends = []
        if exc.tenant_id is not None and self.keyring is not None and \
                self.keyring.check(exc.tenant_id, rec.value, rec.headers) is not None:
            exc.tenant_id = None  # unsigned: no reply in that tenant's name, the DLQ record only
        if exc.code is ErrorCode.MALFORMED or exc.request_id is None or exc.tenant_id is None:
            sends.append((self.cfg.dlq_topic, rec.value, rec.key, dlq_headers(rec.headers, f"{exc.code.value}: {exc}", source, rec.value or b"")))
            self.metrics.dlq.labels(exc.code.value).inc()
        if exc.request_id is not None and exc.tenant_id is not None:
            reply = InferReply.error(exc.code, exc.message, request_id=exc.request_id, tenant_id=exc.tenant_id,
                                     worker_id=self.cfg.worker_id)
            topic = self.sender.topic_for(exc.tenant_id, exc.reply_to)
            sends.append((topic, reply.encode(), exc.tenant_id.encode(), reply.headers()))
        w.status = exc.code.value
        return sends

    def _authenticate(self, p: int, recs: list, now: float, rejected: list) -> list[tuple[Any, str]]:
        """(record, the tenant whose key signed it) for the records of partition ``p`` whose
        signature verifies; the others are refused here (``_refuse``), never decoded."""
        t0 = thread_time()
        verify, now_s, refuse = self.keyring.verify, time.time(), self._refuse
        ok = []
        for rec in recs:
            signer, why = verify(rec.value, rec.headers, now_s)
            if why is None:
                ok.append((rec, signer))
            else:
                refuse(p, rec, why, now, rejected)
        skipped = self._skipped.pop(p, None)
        if skipped is not None:  # unanswered refusals are done at once: the commit moves past them
            self.tracker.track(p, skipped)
            self.tracker.done(p, skipped)
        self.metrics.stage_cpu.add("auth", t0)
        return ok

    def _refuse(self, p: int, rec: Any, why: str, now: float, rejected: list, w: Work | None = None) -> None:
        """A refused record. Answered (an ``unauthenticated`` reply to the tenant its record key
        names, and a DLQ record) within that tenant's refusal budget -- tenants without a key share
        one; beyond it only counted, committed and summed up in the periodic summary DLQ record,
        so a flood of forgeries costs a signature check each and no decode, record or allocation."""
        self._refused[why] = self._refused.get(why, 0) + 1
        key = rec.key
        if self.may_answer_refusal(key if key in self.keyring.tenants else None, now):
            if w is None:
                w = Work(p, rec.offset, now)
                self.tracker.track(p, rec.offset)
                try:
                    w.request = InferRequest.decode(rec.value)
                except WireError as exc:
                    rejected.append((w, self._reject(w, exc, rec)))  # unsigned: the DLQ record only
                    return
            if key is None or w.request.tenant_id.encode() == key:
                rejected.append((w, self._unauthenticated(w, why, rec)))
                return
        if w is None:
            self._skipped[p] = rec.offset  # offsets ascend within a partition's fetch
        else:
            self.tracker.done(p, rec.offset)
        self._unanswered.add(p, rec.offset, why, key)

    def _count_refusals(self) -> None:
        """The refusal metrics, once per round rather than per refused record."""
        if self._refused:
            for why, n in self._refused.items():
                self.metrics.auth_failures.labels(why).inc(n)
            self._refused.clear()
        n, self._unanswered_seen = self._unanswered.n - self._unanswered_seen, self._unanswered.n
        if n > 0:
            self.metrics.auth_unanswered.inc(n)

    async def _send_refusal_summary(self) -> None:
        """One DLQ record for the refusals not answered since the last one (none if there were
        none). Not tied to any offset: those were committed when refused."""
        self._count_refusals()
        summary = self._unanswered.take()
        self._unanswered_seen = 0
        if summary is None:
            return
        summary["worker_id"] = self.cfg.worker_id
        spans = ",".join(f"{p}:{a}-{b}" for p, (a, b) in summary["offsets"].items())
        why = (f"{ErrorCode.UNAUTHENTICATED.value}: {summary['unanswered']} refused requests over their tenants' "
               f"refusal budget, not answered (summary; reasons {summary['reasons']})")
        headers = [(Headers.ERROR, why.encode()), (Headers.SOURCE, f"{self.cfg.requests_topic}/{spans}".encode()[:1000])]
        try:
            fut = await self.producer.send(self.cfg.dlq_topic, json.dumps(summary).encode(),
                                           key=self.cfg.worker_id.encode(), headers=headers)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                                  log.warning("refusal summary not written to the DLQ: %s", f.exception()))
            self.metrics.dlq.labels("unauthenticated_summary").inc()
        except KafkaError as exc:
            log.warning("refusal summary not written to the DLQ: %s", exc)

    async def _refusal_summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.auth_summary_s)
            await self._send_refusal_summary()

    def may_answer_refusal(self, tenant_id: str, now: float) -> bool:
        """Token bucket per tenant: answers to refused requests are bounded, so a flood of forged
        requests cannot make the worker produce two records for each of them."""
        b = self._refusals.get(tenant_id)
        if b is None:
            if len(self._refusals) > 100_000:
                self._refusals.clear()
            b = self._refusals[tenant_id] = [float(self.cfg.auth_refusals_burst), now]
        else:
            b[0] = min(float(self.cfg.auth_refusals_burst), b[0] + (now - b[1]) * self.cfg.auth_refusals_per_s)
            b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True

    def _unauthenticated(self, w: Work, why: str, rec: Any) -> list:
        """A DLQ record (original bytes and headers) and an ``unauthenticated`` reply to the
        tenant's own reply topic, never to the request's reply_to (the request is not trusted)."""
        req = w.request
        self.metrics.dlq.labels(ErrorCode.UNAUTHENTICATED.value).inc()
        source = f"{self.cfg.requests_topic}/{w.partition}/{w.offset}"
        reply = InferReply.error(ErrorCode.UNAUTHENTICATED, f"request not authenticated: {why}",
                                 request_id=req.request_id, tenant_id=req.tenant_id, worker_id=self.cfg.worker_id)
        w.status = ErrorCode.UNAUTHENTICATED.value
        return [(self.cfg.dlq_topic, rec.value, rec.key,
                 dlq_headers(rec.headers, f"{ErrorCode.UNAUTHENTICATED.value}: {why}", source)),
                (self.sender.topic_for(req.tenant_id, None), reply.encode(), req.tenant_id.encode(), reply.headers())]

    def _error(self, w: Work, code: ErrorCode, message: str) -> tuple[Work, InferReply]:
        req = w.request
        reply = InferReply.error(code, message, request_id=req.request_id, tenant_id=req.tenant_id,
                                 worker_id=self.cfg.worker_id)
        w.status = code.value
        return w, reply

    async def _send_errors(self, errors: list[tuple[Work, InferReply]]) -> None:
        if errors:
            await self.sender.send_replies([(w, r, r.encode(), r.headers()) for w, r in errors])

    def _backpressure(self) -> None:
        self.ownership.backpressure(self.tracker.pending, self.cfg.high_water, self.cfg.low_water)
        self.metrics.paused.set(len(self.ownership.backpressured))

    # ------------------------------------------------------------ ownership (leases)
    def set_leases(self, leases: dict[int, tuple[int, float]]) -> None:
        """The agent's current view: partition -> (epoch, valid until on time.monotonic())."""
        self.ownership.set_leases(leases)
        self._wake.set()

    async def release_partition(self, p: int) -> bool:
        """Hand-over, source side: stop fetching p, give back its queued work, let the batches
        already at the engine finish, commit. The target resumes at the first request this worker
        did not answer, so duplicates are bounded by the in-flight batches (not the backlog).
        True when p was still owned and its offsets are committed (then the lease can move);
        the caller ends the hand-over with ``release_done``."""
        if p not in self.owned:
            return False
        self.ownership.begin_release(p)
        start = self._rounds
        while self._rounds < start + 2 and not self.stopping.is_set():
            await asyncio.sleep(0.01)  # a fetch started before the pause has been accepted or skipped
        # Queued, not yet computed: not ours to answer any more; they stay outstanding so that
        # the commit below stops before the first of them and the target reads them again.
        given_back = len(self.batcher.remove(lambda item: item.payload.partition == p))
        deadline = time.monotonic() + self.cfg.handover_drain_s
        while self.tracker.pending(p) > given_back and p in self.owned and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        left = self.tracker.pending(p) - given_back
        await self._commit()
        ok = p in self.owned and p not in self.tracker.to_commit()
        if left:
            log.warning("partition %d released with %d computed requests unreplied; they will be replayed", p, left)
        log.info("partition %d released; %d queued requests left for the next owner", p, given_back)
        self.ownership.let_go(p)
        return ok

    def release_done(self, p: int) -> None:
        self.ownership.end_release(p)

    def prefetch(self, tenant_ids: list[str]) -> Any:
        """Warm hand-over, target side: make the partition's hot tenants resident ahead of time."""
        return self.engine.prefetch(tenant_ids)

    # ------------------------------------------------------------ load report
    def _count_load(self, works: list[Work]) -> None:
        load = self._load
        for w in works:
            c = load.setdefault(w.partition, {}).setdefault(w.request.tenant_id, [0, 0])
            c[0] += 1
            c[1] += len(w.token_ids or ())

    def take_load(self) -> dict[str, Any]:
        """Counts since the last call plus gauges; the agent turns them into rates."""
        counts, self._load = self._load, {}
        hw = {}
        # Only what the consumer is assigned: right after start (or a lease change) an owned
        # partition may not be assigned yet, and aiokafka raises for those.
        assigned = self.consumer.assignment() if self.consumer else set()
        for p in self.owned:
            tp = TopicPartition(self.cfg.requests_topic, p)
            h = self.consumer.highwater(tp) if tp in assigned else None
            if h is not None:
                hw[p] = h
        return {"counts": counts, "highwater": hw, "lag": {p: self._lag.get(p, 0) for p in self.owned},
                "queue_depth": len(self.batcher), "inflight": self.tracker.pending(),
                "owned": dict(self.owned), "releasing": sorted(self.ownership.releasing)}

    # ------------------------------------------------------------ batching + engine
    async def _batch_loop(self) -> None:
        while True:
            now_ms = time.time() * 1000
            draining = self.stopping.is_set()
            # Work-conserving: with nothing at the engine, waiting to fill a batch only adds
            # latency, so what is queued goes now; while the engine computes, batches fill.
            idle = self.cfg.idle_dispatch and self._at_engine == 0
            if not (self.batcher.ready(now_ms) or ((draining or idle) and len(self.batcher))):
                self._wake.clear()
                wait = self.batcher.wait_ms(now_ms)
                try:
                    await asyncio.wait_for(self._wake.wait(), None if wait == float("inf") else wait / 1000)
                except TimeoutError:
                    pass
                continue
            await self._inflight.acquire()
            t0 = thread_time()
            batch, expired = self.batcher.next_batch(time.time() * 1000)
            errors = [self._error(p.payload, ErrorCode.EXPIRED, "deadline passed before compute") for p in expired]
            works = [p.payload for p in batch]
            future = None
            if works:
                try:
                    future = self.engine.submit(self.tok.pack(works))
                except Exception as exc:  # a batch the engine refuses fails its own requests only
                    errors += [self._error(w, ErrorCode.INTERNAL, f"engine refused batch: {exc}") for w in works]
            self.metrics.stage_cpu.add("batch", t0)
            if future is not None:
                self._at_engine += 1
            if future is None:
                self._inflight.release()
                await self._send_errors(errors)
                continue
            await self._send_errors(errors)
            self.metrics.batch_seqs.observe(len(works))
            self.metrics.batch_tokens.observe(sum(len(w.token_ids) for w in works))
            self.metrics.batch_tenants.observe(len({w.request.tenant_id for w in works}))
            upcoming = self.batcher.upcoming_tenants()
            if upcoming:
                self.engine.prefetch(upcoming)
            self._spawn(self._complete(works, future, time.monotonic()))

    async def _complete(self, works: list[Work], future: Any, t_submit: float) -> None:
        try:
            outputs = await asyncio.wrap_future(future)
        except Exception as exc:
            log.exception("engine batch failed")
            outputs = None
            err = exc
        finally:
            self._inflight.release()
            self._at_engine -= 1
            if self._at_engine == 0 and len(self.batcher):
                self._wake.set()  # the engine went idle with work queued: send it now
        t_done = time.monotonic()
        self.metrics.engine_seconds.observe(t_done - t_submit)
        if outputs is None:
            await self._send_errors([self._error(w, ErrorCode.INTERNAL, f"engine failed: {err}") for w in works])
            return
        t0 = thread_time()
        failed = 0
        compute_ms = round((t_done - t_submit) * 1e3, 3)
        worker_id = self.cfg.worker_id
        replies = []
        for w, out in zip(works, outputs):
            req = w.request
            timings = {"queue_ms": round((t_submit - w.received) * 1e3, 3), "compute_ms": compute_ms,
                       "total_ms": round((t_done - w.received) * 1e3, 3)}
            replies.append(reply_for_output(out, request_id=req.request_id, tenant_id=req.tenant_id,
                                            worker_id=worker_id, timings=timings))
            failed += out.error is not None
        # One call for the batch; a reply that fails validation (a NaN score) is replaced by an
        # internal error reply, so one bad output can never leave its batch unanswered.
        built = list(replies)
        values, headers = encode_replies(replies)
        items = []
        for w, reply, value, hdrs, first in zip(works, replies, values, headers, built):
            if reply is not first:
                log.warning("tenant %s: %s", reply.tenant_id, reply.error_message)
            w.status = reply.status.value
            items.append((w, reply, value, hdrs))
        if failed:
            self.metrics.adapter_lookups.labels("error").inc(failed)
        self.metrics.adapter_lookups.labels("ok").inc(len(works) - failed)
        self.metrics.stage_cpu.add("reply_encode", t0)
        await self.sender.send_replies(items)

    # ------------------------------------------------------------ commits, lag, versions
    async def commit(self) -> None:
        """Commit what is acknowledged (fenced); also used by an edge whose engine went away."""
        await self._commit()

    async def _commit(self) -> None:
        # Fencing: in lease mode only partitions owned under a lease that is valid now.
        offsets = self.ownership.fenced(self.tracker.to_commit())
        if not offsets:
            return
        self.crash.before_commit_hook()
        st = self.metrics.stage_cpu
        t0, c0 = thread_time(), st.charged
        try:
            await self.consumer.commit({TopicPartition(self.cfg.requests_topic, p): OffsetAndMetadata(o, "")
                                        for p, o in offsets.items()})
            self.tracker.mark_committed(offsets)
            self.metrics.commits.inc()
        except KafkaError as exc:
            self.metrics.commit_errors.inc()
            log.warning("offset commit failed (will retry): %s", exc)
        finally:
            st.add_around_await("commit", t0, c0)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.commit_interval_ms / 1000)
            await self._commit()

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(2)
            assigned = self.consumer.assignment()  # owned but not assigned yet: aiokafka asserts
            for p in list(self.owned):
                tp = TopicPartition(self.cfg.requests_topic, p)
                if tp not in assigned:
                    continue
                hw = self.consumer.highwater(tp)
                if hw is None:
                    continue
                try:
                    pos = await self.consumer.position(tp)
                except KafkaError:
                    continue
                self._lag[p] = max(0, hw - pos)
                self.metrics.lag.labels(str(p)).set(self._lag[p])

    async def _reload_keys(self, initial: bool = False) -> None:
        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, self.load_keys)
        except Exception as exc:  # noqa: BLE001 - keep serving with the keys already held
            if initial:
                raise
            log.warning("tenant keys not refreshed (keeping %d): %s", len(self.keyring), exc)
            return
        self.keyring.replace(rows)
        self.metrics.auth_keys.set(len(rows))

    async def _keys_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.auth_keys_poll_s)
            await self._reload_keys()

    async def _version_loop(self) -> None:
        await follow_active_versions(self.version_changes, self.engine.invalidate, self.cfg.version_poll_s)

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
