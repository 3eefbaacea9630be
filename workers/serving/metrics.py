"""Prometheus metrics of a worker (one registry per worker so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self) -> None:
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
