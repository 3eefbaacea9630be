"""`flockserve worker`: build the engine, the store-backed loader and the Kafka loop; run until
SIGTERM/SIGINT, then shut down cleanly within the configured bound."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import generate_latest

from workers.adapters.store import AdapterStore, make_backend
from workers.config import Settings, follows_leases, parse_partitions
from workers.auth import key_loader
from workers.db import session_factory
from workers.kafka_conn import kafka_options
from workers.models import resolve_model_dir
from workers.serving.adapter_source import StoreLoader, VersionFeed
from workers.serving.batcher import BatchPolicy
from workers.serving.capacity import measure_capacity
from workers.serving.http import serve_http
from workers.serving.group import WorkerGroup, edge_count
from workers.serving.metrics import EngineChoicesCollector, PlotCollector, WorkerMetrics, merge_exposition
from workers.serving.tokens import IntakeTokenizer
from workers.serving.worker import Worker, WorkerConfig

log = logging.getLogger("flock.worker")


def worker_config(s: Settings) -> WorkerConfig:
    return WorkerConfig(
        worker_id=s.worker_id, bootstrap=s.kafka_bootstrap, requests_topic=s.requests_topic,
        replies_topic=s.replies_topic, dlq_topic=s.dlq_topic, group_id=s.consumer_group,
        partitions=parse_partitions(s.partitions, s.request_partitions), max_seq_len=s.max_seq_len,
        truncate=s.truncate,
        policy=BatchPolicy(max_tokens=s.batch_max_tokens, max_seqs=s.batch_max_seqs,
                           max_tenants=s.batch_max_tenants, max_wait_ms=s.batch_max_wait_ms),
        idle_dispatch=s.batch_idle_dispatch,
        inflight_batches=s.inflight_batches, high_water=s.partition_high_water, low_water=s.partition_low_water,
        commit_interval_ms=s.commit_interval_ms, version_poll_s=s.version_poll_s,
        shutdown_timeout_s=s.shutdown_timeout_s, follow_leases=follows_leases(s.partitions),
        handover_drain_s=s.handover_drain_s, produce_linger_ms=s.produce_linger_ms,
        fetch_min_bytes=s.fetch_min_bytes, fetch_max_wait_ms=s.fetch_max_wait_ms,
        produce_max_batch_bytes=s.produce_max_batch_bytes, kafka=kafka_options(s),
        auth_required=s.auth_required, auth_keys_poll_s=s.auth_keys_poll_s,
        auth_refusals_burst=s.auth_refusals_burst, auth_refusals_per_s=s.auth_refusals_per_s,
        auth_summary_s=s.auth_summary_s,
        tenant_reply_prefix=s.reply_topic_prefix if s.tenant_reply_topics else None)


def keys_for(s: Settings):
    """The tenant-key loader of a worker (or edge) that checks signatures, else None."""
    return key_loader(s.database_url) if s.auth_required else None


def build_engine(s: Settings, store: AdapterStore):
    from workers.engine.runtime import Engine  # the only place the data plane meets torch

    from workers.engine.options import EngineOptions
    from workers.engine.pool import PoolConfig

    model_dir = resolve_model_dir(s.default_base_model, s.models_dir)
    device = None if s.device == "auto" else s.device
    pool = PoolConfig(device_bytes=s.adapter_device_bytes, host_bytes=s.adapter_host_bytes,
                      default_slots=s.adapter_slots, load_threads=s.adapter_load_threads)
    engine = Engine(str(model_dir), StoreLoader(store, s.default_base_model), device=device,
                    pool_config=pool, options=EngineOptions.from_settings(s),
                    plot_device_bytes=s.plot_device_bytes, plot_host_bytes=s.plot_host_bytes,
                    plot_insert_rows=s.plot_insert_rows)
    log.info("engine on %s (%s), kernels: %s", engine.device, engine.dtype, engine.tuned_choices())
    return engine, model_dir


def engine_stats(engine, resident_listed: int) -> dict:
    """Resident tenants (how many, and the ``resident_listed`` most recently used) and free
    adapter memory for the load report (best effort: a report must never break serving)."""
    try:
        pool = engine.pool
        return {"resident_count": len(pool.residents), "resident_tenants": pool.recent(resident_listed),
                "free_adapter_bytes": pool.free_bytes(),
                "device_kind": engine.device.type}
    except Exception as exc:  # noqa: BLE001
        log.debug("engine stats unavailable: %s", exc)
        return {}


async def run_worker(s: Settings) -> None:
    store = AdapterStore(session_factory(s.database_url), make_backend(s.store_backend, s.store_dir),
                         max_bytes=s.max_adapter_bytes, models_dir=s.models_dir)
    engine, model_dir = build_engine(s, store)
    capacity = s.worker_capacity if s.worker_capacity is not None else measure_capacity(engine)
    n_edges = edge_count(s.edges)
    metrics = WorkerMetrics()
    metrics.registry.register(EngineChoicesCollector(engine.tuned_choices))
    metrics.registry.register(PlotCollector(engine.plot_stats))
    versions = VersionFeed(store).changes
    if n_edges == 0:  # one process: the Kafka loop next to the engine
        worker = Worker(worker_config(s), engine, IntakeTokenizer(str(model_dir), s.truncate), metrics,
                        version_changes=versions, load_keys=keys_for(s))
        metrics_body = None
    else:  # this process hosts the engine; edge processes run the Kafka loop
        worker = WorkerGroup(s, engine, parse_partitions(s.partitions, s.request_partitions), n_edges, metrics,
                             version_changes=versions, max_inflight=s.inflight_batches)

        async def metrics_body() -> bytes:
            return merge_exposition([generate_latest(metrics.registry), *await worker.edge_metrics()])
    # The control-plane agent: registry heartbeat always, lease following in "leases" mode.
    from workers.manager.agent import RESIDENT_LISTED, WorkerAgent

    agent = WorkerAgent(s, worker, engine_stats=lambda: engine_stats(engine, RESIDENT_LISTED),
                        capacity=capacity)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    server = None
    if s.http_port:
        server = await serve_http(s.http_host, s.http_port, metrics.registry,
                                  live=lambda: True, ready=lambda: worker.ready, metrics=metrics_body)
    agent_task = asyncio.create_task(agent.run())
    try:
        await worker.run()
    finally:
        await agent.stop(agent_task)  # after the final commit: give the leases back at once
        if server is not None:
            server.close()
        engine.close()


def main(s: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(s))
