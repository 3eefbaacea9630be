"""Settings from the environment (``FLOCK_*``), with defaults for the local services."""

from __future__ import annotations

import os
import socket
import urllib.parse
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schema import topics
from workers.engine.pets.registry import default_cost_weights  # torch-free

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_", extra="ignore")

    # Services (scripts/services starts these on loopback; compose.yaml maps the same ports).
    kafka_bootstrap: str = "127.0.0.1:19092"
    database_url: str = "postgresql://flock:flock@127.0.0.1:15432/flock"

    # PostgreSQL TLS (libpq names; also accepted as ?sslmode=&sslrootcert= in the URL).
    database_sslmode: str | None = Field(None, pattern="^(disable|allow|prefer|require|verify-ca|verify-full)$")
    database_sslrootcert: Path | None = None

    # Kafka connection security, for every client (workers/kafka_conn.py). Secrets come from the
    # environment or from *_file paths and are never printed (SecretStr).
    kafka_security_protocol: str = Field("PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$")
    kafka_sasl_mechanism: str = Field("PLAIN", pattern="^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512|OAUTHBEARER)$")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_oauth_token_file: Path | None = None  # OAUTHBEARER: the token, re-read on every login
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None  # client certificate (mutual TLS)
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True

    # Tenant authentication on the data path (workers/auth.py; docs/security.md). Off for local
    # development; compose.yaml's production profile turns both on.
    auth_required: bool = False  # requests must carry a valid HMAC of a tenant key (flock-auth header)
    auth_keys_poll_s: float = 5.0  # how often a worker re-reads tenant keys (new, rotated, revoked)
    key_rotation_overlap_s: float = 86400.0  # after a rotation the old key stays valid this long
    # Refused requests answered (unauthenticated reply + DLQ record) per tenant: this burst, then
    # this rate; the rest of a flood of forgeries is only counted (flock_auth_unanswered_total).
    auth_refusals_burst: int = 20
    auth_refusals_per_s: float = 1.0
    auth_summary_s: float = 10.0  # the refusals not answered are summed up in one DLQ record per period
    # Replies go to the tenant's own topic <reply_topic_prefix><tenant_id> (Kafka ACLs keep it
    # private); a request's reply_to is honoured only when it names that topic.
    tenant_reply_topics: bool = False
    reply_topic_prefix: str = topics.TENANT_REPLY_PREFIX
    tenant_key: SecretStr | None = None  # the SDK's key (<key_id>.<secret>): it signs every request

    # Topics
    requests_topic: str = topics.REQUESTS_TOPIC
    replies_topic: str = topics.REPLIES_TOPIC
    dlq_topic: str = topics.DLQ_TOPIC
    routing_topic: str = topics.ROUTING_TOPIC
    request_partitions: int = topics.REQUEST_PARTITIONS
    consumer_group: str = topics.CONSUMER_GROUP

    # Training jobs (workers/trainer/jobs.py, `flockserve trainer`)
    train_topic: str = topics.TRAIN_TOPIC
    train_replies_topic: str = topics.TRAIN_REPLIES_TOPIC  # for jobs that name no reply_to
    trainer_group: str = topics.TRAINER_GROUP
    train_max_attempts: int = Field(3, ge=1)  # pick-ups of one job (trainer crashes) before it fails
    train_progress_s: float = 2.0  # how often a running job's progress is written to its row
    train_prefetch: int = Field(4, ge=1)  # jobs fetched (and recorded queued) ahead of the running one
    # A trainer busy longer than this (prefetched jobs together) is taken out of its group.
    train_max_busy_s: float = 6 * 3600.0

    # Adapter store
    store_backend: str = Field("postgres", pattern="^(postgres|filesystem)$")
    store_dir: Path = REPO_ROOT / ".flock" / "blobs"
    max_adapter_bytes: int = 256 * 1024 * 1024
    default_base_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    models_dir: Path = REPO_ROOT / ".flock" / "models"

    # Worker
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # "all" / "0,1,4-7": static assignment (no manager needed); "leases": follow the manager's leases.
    partitions: str = "all"
    # Relative throughput for the balancer, in thousands of tokens/s: measured at start by a short
    # timed forward pass (workers/serving/capacity.py) unless set here (then set on every worker).
    worker_capacity: float | None = None
    # One command, several workers (`flockserve worker run --gpus/--replicas`, workers/serving/
    # supervisor.py): one process per GPU ("all", a count, or ordinals "0,1"), or N CPU workers.
    gpus: str = ""
    replicas: int = Field(0, ge=0)
    max_seq_len: int = 512  # tokens; longer inputs get input_too_large unless truncate is set
    truncate: bool = False
    batch_max_tokens: int = 16384
    batch_max_seqs: int = 256
    batch_max_tenants: int = 128
    batch_max_wait_ms: float = 10.0
    batch_idle_dispatch: bool = True  # with nothing in flight at the engine, queued work goes at once
    inflight_batches: int = 2  # batches queued at the engine: n+1 is prepared while n runs
    # The engine's adapter pool. A batch pins its distinct tenants, so adapter_slots (per bank:
    # PET type + shape) must be at least batch_max_tenants. A bank takes its slots when first
    # needed, so many banks of many slots can use up the device budget: raise this for many
    # tenants of few PET shapes (10,000 LoRA tenants: FLOCK_ADAPTER_SLOTS=10500).
    adapter_slots: int = 256
    adapter_device_bytes: int = 0  # 0 = a quarter of the GPU's memory (2 GiB on CPU)
    adapter_host_bytes: int = 4 << 30  # converted (pinned) copies kept on the host
    adapter_load_threads: int = 8  # cold misses load in parallel (store read, sha256, checks)
    # Engine kernel choices (workers/engine/options.py; bench/engine.py times them on the GPU).
    lora_into_gemm: bool = False  # LoRA expand writes into the base GEMM's output (beta = 1)
    lora_fused: str = Field("auto", pattern="^(auto|0|1)$")  # fused LoRA shrink+expand: timed | off | on
    lora_gemm: str = Field("0", pattern="^(auto|0|1)$")  # LoRA delta in a Triton GEMM's epilogue: timed | off | on
    varlen_attn: str = Field("auto", pattern="^(auto|triton|flash)$")  # unequal lengths: timed | kernel
    # Lower-layer skipping (a base built by `flockserve base build-plot`): the tri-gram table's
    # budgets, hot rows on the device, the rest in pinned host memory (workers/engine/plot/table.py).
    plot_device_bytes: int = 1 << 30
    plot_host_bytes: int = 4 << 30
    plot_insert_rows: int = Field(8192, ge=0)  # new tri-gram rows a batch may add to the table
    partition_high_water: int = 2000  # pause a partition with this many unreplied requests
    partition_low_water: int = 500  # and resume it below this
    commit_interval_ms: int = 200
    version_poll_s: float = 5.0  # how often to look for new active adapter versions
    shutdown_timeout_s: float = 30.0
    produce_linger_ms: float = 2.0  # replies: how long the producer waits to fill a batch
    # Requests: the broker answers a fetch once it has this many bytes or this long has passed.
    # Below capacity each fetch would otherwise carry a record or two, and its protocol work in
    # aiokafka's Python is paid per fetch (docs/dataplane.md: "Fetch coalescing").
    fetch_min_bytes: int = Field(64 * 1024, ge=1)
    fetch_max_wait_ms: int = Field(5, ge=0)
    produce_max_batch_bytes: int = 256 * 1024  # replies: bytes per record batch and partition
    # Processes per worker: 0 = one process (Kafka loop and engine together); N >= 1 = one engine
    # process owning the device plus N edge processes running the Kafka loop. "auto": from the cores.
    edges: str = "auto"
    http_host: str = "127.0.0.1"
    http_port: int = 9400  # /metrics /livez /readyz; 0 disables

    # Control plane (workers/manager). Short values in tests; seconds unless named otherwise.
    heartbeat_s: float = 2.0  # worker -> workers row (load report)
    lease_poll_s: float = 0.5  # worker re-reads/renews its leases this often (NOTIFY wakes it sooner)
    lease_timeout_s: float = 10.0  # a lease not renewed for this long is taken away
    worker_timeout_s: float = 10.0  # a worker silent for this long is marked dead
    rate_window_s: float = 10.0  # load rates are averaged over this window
    handover_timeout_s: float = 20.0  # a hand-over stuck this long is cancelled or forced
    handover_drain_s: float = 10.0  # the source waits this long for in-flight replies, then commits what is done
    manager_tick_s: float = 1.0
    rebalance_auto: bool = True
    rebalance_threshold: float = 1.25  # max/mean load that triggers an automatic rebalance
    rebalance_target: float = 1.10  # stop moving partitions at this imbalance (hysteresis)
    rebalance_min_dwell_s: float = 30.0  # a partition stays this long with its owner before it moves again
    rebalance_cooldown_s: float = 15.0  # pause between automatic rebalances (rates settle)
    rebalance_max_moves: int = 4
    # Relative cost of a token by PET type (the PET op on top of the shared GEMMs); defaults from
    # each type's registry entry. Measure and override: FLOCK_PET_COST_WEIGHTS='{"diff": 1.4, ...}'.
    pet_cost_weights: dict[str, float] = Field(default_factory=default_cost_weights)
    spread_hot_tenants: bool = True
    hot_tenant_factor: float = 1.5  # spread a tenant above this many partitions' fair share of load

    @model_validator(mode="after")
    def _database_tls(self) -> "Settings":
        # Into the URL itself, so every driver (psycopg2, asyncpg) and every caller gets it.
        self.database_url = with_query(self.database_url, sslmode=self.database_sslmode,
                                       sslrootcert=self.database_sslrootcert and str(self.database_sslrootcert))
        return self


LEASES = "leases"


def follows_leases(spec: str) -> bool:
    return spec.strip() == LEASES


def parse_partitions(spec: str, total: int) -> list[int]:
    """"all" or a comma list of numbers and ranges ("0,2,5-7") -> sorted partition numbers.
    "leases" means every partition may be leased to this worker (it owns none at start)."""
    if spec.strip() in ("all", LEASES):
        return list(range(total))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    bad = [p for p in out if not 0 <= p < total]
    if bad:
        raise ValueError(f"partitions {bad} outside 0..{total - 1}")
    return sorted(out)


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


def with_query(url: str, **params: str | None) -> str:
    """``url`` with the given query parameters added (those already in it are kept)."""
    add = {k: v for k, v in params.items() if v is not None and f"{k}=" not in url.partition("?")[2]}
    if not add:
        return url
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(add)


def _with_driver(url: str, driver: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}+{driver}://{rest}"


def sync_database_url(url: str) -> str:
    """The database through the synchronous driver (CLI, Alembic, the adapter store)."""
    return _with_driver(url, "psycopg2")


def async_database_url(url: str) -> str:
    """The database through the asyncio driver (worker and manager event loops)."""
    return _with_driver(url, "asyncpg")
