"""Prometheus metrics of a worker (one registry per worker so tests can run several)."""

from __future__ import annotations

import json
import os
import threading
from time import thread_time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, engine_in_process: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        self.batch_seqs = Histogram("flock_batch_sequences", "Sequences per engine batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_tokens = Histogram("flock_batch_tokens", "Tokens per engine batch", registry=r,
                                      buckets=(64, 256, 1024, 4096, 8192, 16384, 32768, 65536))
        self.batch_tenants = Histogram("flock_batch_tenants", "Distinct tenants per engine batch", registry=r,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.inflight_peak = Gauge("flock_inflight_requests_peak", "Most unreplied requests held at once",
                                   registry=r)
        self.queue_depth = Gauge("flock_queue_depth", "Requests waiting in the batcher", registry=r)
        self.inflight = Gauge("flock_inflight_requests", "Consumed requests without an acked reply", registry=r)
        self.latency = Histogram("flock_request_latency_seconds", "Consume-to-reply-ack latency per tenant",
                                 ["tenant"], registry=r, buckets=LATENCY_BUCKETS)
        self.replies = Counter("flock_replies_total", "Replies acked, by status", ["status"], registry=r)
        self.dlq = Counter("flock_dlq_total", "Records sent to the dead-letter topic, by reason", ["reason"], registry=r)
        self.commits = Counter("flock_commits_total", "Offset commits", registry=r)
        self.commit_errors = Counter("flock_commit_errors_total", "Failed offset commits", registry=r)
        self.adapter_lookups = Counter("flock_adapter_lookups_total", "Adapter acquisitions, by result",
                                       ["result"], registry=r)
        self.lag = Gauge("flock_consumer_lag", "High-water mark minus position", ["partition"], registry=r)
        self.paused = Gauge("flock_paused_partitions", "Partitions paused by back-pressure", registry=r)
        self.engine_seconds = Histogram("flock_engine_batch_seconds", "Engine time per batch", registry=r,
                                        buckets=LATENCY_BUCKETS)
        self.produce_batches = Counter("flock_produce_batches_total", "Record batches handed to the producer",
                                       registry=r)
        self.produce_records = Counter("flock_produce_records_total", "Records in those batches", registry=r)
        self.kafka_info = Info("flock_kafka_client", "aiokafka version and whether its C record codecs are in use",
                               registry=r)
        self.edge_restarts = Counter("flock_edge_restarts_total", "Edge processes restarted by the group",
                                     registry=r)
        self.engine_batch_seqs = Histogram("flock_engine_batch_sequences", "Sequences per merged engine batch "
                                           "(edge batches of a worker group)", registry=r,
                                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.auth_failures = Counter("flock_auth_failures_total", "Requests refused as unauthenticated, by reason",
                                     ["reason"], registry=r)
        self.auth_unanswered = Counter("flock_auth_unanswered_total", "Refused requests over their tenant's "
                                       "refusal budget: counted and committed, no reply or DLQ record", registry=r)
        self.auth_keys = Gauge("flock_auth_keys", "Tenant keys this worker accepts", registry=r)
        self.reply_to_refused = Counter("flock_reply_to_refused_total", "Requests whose reply_to named a topic "
                                        "the tenant does not own (replied to its own topic instead)", registry=r)
        self.stage_cpu = StageCPU()
        r.register(CPUCollector(self.stage_cpu, engine_in_process))


class EngineChoicesCollector:
    """``flock_engine_kernels_info``: the engine's kernel options and what its auto-tuning chose
    (``Engine.tuned_choices()``), read at each scrape since choices are made on first batches."""

    def __init__(self, choices) -> None:
        self.choices = choices

    def collect(self):
        m = InfoMetricFamily("flock_engine_kernels", "Engine kernel options and the choices auto-tuning made")
        m.add_metric([], {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                          for k, v in self.choices().items()})
        yield m


class PlotCollector:
    """Lower-layer skipping (``Engine.plot_stats()``; nothing for a plain base): tri-gram table
    rows and bytes per tier, lookups by result, hit rate, lookup / compute seconds (totals and the
    last batch's)."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        st = self.stats()
        if st is None:
            return
        rows = GaugeMetricFamily("flock_plot_table_rows", "Tri-gram table rows, by tier", labels=["tier"])
        nbytes = GaugeMetricFamily("flock_plot_table_bytes", "Tri-gram table bytes, by tier", labels=["tier"])
        for tier in ("device", "host"):
            rows.add_metric([tier], st[f"{tier}_rows"])
            nbytes.add_metric([tier], st[f"{tier}_bytes"])
        looks = CounterMetricFamily("flock_plot_lookups", "Distinct tri-grams looked up per batch, by result",
                                    labels=["result"])
        for res, key in (("device", "hits_device"), ("host", "hits_host"), ("miss", "misses")):
            looks.add_metric([res], st[key])
        secs = CounterMetricFamily("flock_plot_seconds", "Table lookup and miss compute time", labels=["stage"])
        last = GaugeMetricFamily("flock_plot_last_batch_ms", "Lookup and miss compute time of the last batch",
                                 labels=["stage"])
        for stage in ("lookup", "compute"):
            secs.add_metric([stage], st[f"{stage}_seconds"])
            last.add_metric([stage], st[f"last_{stage}_ms"])
        kept = CounterMetricFamily("flock_plot_not_admitted", "Computed tri-grams not kept: over the per-batch "
                                   "insert cap (FLOCK_PLOT_INSERT_ROWS) or the table's capacity",
                                   labels=["reason"])
        kept.add_metric(["insert_cap"], st["not_admitted"])
        kept.add_metric(["capacity"], st["dropped"])
        yield from (rows, nbytes, looks, secs, last, kept,
                    GaugeMetricFamily("flock_plot_hit_rate", "Share of looked-up tri-grams found in the table",
                                      value=st["hit_rate"] or 0.0))


# --------------------------------------------------------------------------- CPU accounting
# Where the host path spends CPU, for bench/dataplane.py and operators. Stages are timed per
# batch of work (never per request) with time.thread_time() on the thread doing the work.
STAGES = ("consume", "decode", "auth", "tokenise", "batch", "engine", "reply_encode", "produce", "commit")


class StageCPU:
    """Per-stage CPU seconds of this process, exported as ``flock_stage_cpu_seconds_total{stage}``.

    ``add(stage, t0)`` charges ``thread_time() - t0`` to ``stage``. Only sections that do not
    yield to the event loop are timed, so a stage never absorbs another task's work. The
    ``engine`` stage is the CPU of the engine's own threads, read from /proc at scrape time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.charged = 0.0  # all stages together, so an await can leave out what ran inside it

    def add(self, stage: str, t0: float) -> None:
        dt = thread_time() - t0
        self.seconds[stage] += dt
        self.charged += dt

    def add_off_loop(self, stage: str, t0: float) -> None:
        """Charge work done on another thread (tokeniser pool): not subtracted from awaits."""
        self.seconds[stage] += thread_time() - t0

    def add_around_await(self, stage: str, t0: float, charged0: float) -> None:
        """Charge an awaited section, minus the timed stages that ran while it was suspended."""
        dt = thread_time() - t0 - (self.charged - charged0)
        self.seconds[stage] += dt
        self.charged += dt


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "loop"
    if name.startswith("flock-tokenize"):
        return "tokenise"
    if name.startswith(("flock-engine", "flock-prefetch", "flock-pool")):
        return "engine"
    return "other"


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu() -> dict[str, float]:
    """CPU seconds per kind of thread of this process (loop, tokenise, engine, other), from
    /proc/self/task. Threads Python does not know (torch/OpenMP, tokenizers' pool) are 'other'."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {"loop": 0.0, "tokenise": 0.0, "engine": 0.0, "other": 0.0}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        secs = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        out[_thread_kind(names.get(int(tid), ""))] += secs
    return out


class CPUCollector:
    """Exports StageCPU and per-thread CPU (engine stage included) on scrape."""

    def __init__(self, stages: StageCPU, engine_in_process: bool = True) -> None:
        self.stages = stages
        self.engine_in_process = engine_in_process

    def collect(self):
        threads = thread_cpu()
        st = CounterMetricFamily("flock_stage_cpu_seconds", "CPU seconds spent per host-path stage "
                                 "(per batch; engine = the engine threads)", labels=["stage"])
        for stage, secs in self.stages.seconds.items():
            if stage == "engine" and self.engine_in_process:
                secs += threads["engine"]
            st.add_metric([stage], secs)
        yield st
        th = CounterMetricFamily("flock_thread_cpu_seconds", "CPU seconds per kind of thread", labels=["thread"])
        for kind, secs in threads.items():
            th.add_metric([kind], secs)
        yield th


def merge_exposition(texts: list[bytes]) -> bytes:
    """Several processes' /metrics bodies as one: samples with the same name and labels are
    summed (counters, histograms, gauges such as queue depth); info/stateset samples take the max."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict]] = {}
    for text in texts:
        if not text:
            continue
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name.endswith("_created"):
                continue
            _, _, samples = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for smp in fam.samples:
                if smp.name.endswith("_created"):
                    continue
                key = (smp.name, tuple(sorted(smp.labels.items())))
                if fam.type in ("info", "stateset") or smp.name.endswith("_info"):
                    samples[key] = max(samples.get(key, 0.0), smp.value)
                else:
                    samples[key] = samples.get(key, 0.0) + smp.value

    def esc(v: str) -> str:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    lines = []
    for name, (typ, doc, samples) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {typ}")
        for (sname, labels), value in samples.items():
            lab = "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{sname}{lab} {value!r}")
    return ("\n".join(lines) + "\n").encode()
