"""Real-process helpers for data-plane tests: topics, tenants, worker subprocesses, collectors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schema.messages import InferReply, InferRequest
from tests.adapter_factory import MINILM, random_delta
from workers.adapters.store import AdapterStore, make_backend
from workers.kafka_admin import ensure_topics
from workers.models import base_dims
from workers.tenants import TenantRegistry
from workers.kafka_conn import kafka_options

ROOT = Path(__file__).resolve().parent.parent

PETS = [("lora", {"r": 4, "alpha": 8, "sites": ["q", "v"]}),
        ("lora", {"r": 8, "alpha": 8, "sites": ["ffn_in"]}),
        ("bitfit", {}),
        ("ia3", {"sites": ["k", "v", "ffn_in"]}),
        ("adapter", {"variant": "pfeiffer", "bottleneck": 8}),
        ("diff", {"sites": ["q"]})]


@dataclass
class Topics:
    requests: str
    replies: str
    dlq: str
    partitions: int

    def env(self) -> dict[str, str]:
        return {"FLOCK_REQUESTS_TOPIC": self.requests, "FLOCK_REPLIES_TOPIC": self.replies,
                "FLOCK_DLQ_TOPIC": self.dlq, "FLOCK_REQUEST_PARTITIONS": str(self.partitions)}


async def make_topics(bootstrap: str, tag: str, partitions: int = 3) -> Topics:
    t = Topics(f"req.{tag}", f"rep.{tag}", f"dlq.{tag}", partitions)
    await ensure_topics(bootstrap, {t.requests: (partitions, {}), t.replies: (2, {}), t.dlq: (1, {})})
    return t


def make_tenants(sessions, tag: str, n: int) -> list[str]:
    """n tenants with small deltas of several PET types and differing label counts."""
    reg, store = TenantRegistry(sessions), AdapterStore(sessions, make_backend("postgres", Path("/nonexistent")))
    dims = base_dims(MINILM)
    out = []
    for i in range(n):
        tid = f"{tag}-{i}"
        pet, cfg = PETS[i % len(PETS)]
        config = {**cfg, "task": "seq_cls", "labels": [f"l{j}" for j in range(2 + i % 3)], "pooling": "mean"}
        tensors = random_delta(pet, config, dims, seed=i)
        if pet == "ia3":
            tensors = {k: (1 + v if k.endswith(".scale") else v) for k, v in tensors.items()}
        tensors["head.weight"] = torch.randn(len(config["labels"]), dims.hidden, generator=torch.Generator().manual_seed(i))
        reg.create(tid)
        store.import_tensors(tid, pet, config, tensors, MINILM)
        out.append(tid)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`flockserve worker run` as a real subprocess."""

    def __init__(self, database_url: str, topics: Topics, tag: str, **extra: str):
        self.port = free_port()
        self.log_path = ROOT / ".flock" / "logs" / f"test-worker-{tag}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **topics.env(), "FLOCK_DATABASE_URL": database_url,
                    "FLOCK_CONSUMER_GROUP": f"grp-{tag}", "FLOCK_HTTP_PORT": str(self.port),
                    "FLOCK_WORKER_ID": f"w-{tag}-{self.port}", "FLOCK_DEVICE": "cpu",
                    "FLOCK_BATCH_MAX_TOKENS": "4096", "FLOCK_COMMIT_INTERVAL_MS": "100",
                    # equal workers: a capacity measured on 2 shared cores is noise to the balancer
                    "FLOCK_WORKER_CAPACITY": "1", **extra}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180, poll_s: float = 0.3) -> "WorkerProcess":
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "run"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.log_tail()}")
            if self.get("/readyz")[0] == 200:
                return self
            time.sleep(poll_s)
        raise AssertionError(f"worker not ready: {self.log_tail()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def metric(self, name: str) -> float | None:
        status, body = self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise AssertionError("worker did not exit within the shutdown bound")
        return self.proc.returncode if self.proc else 0

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""


async def produce(bootstrap: str, topic: str, reqs: list[InferRequest], raw: list[bytes] = ()) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=5)
    await p.start()
    try:
        futs = [await p.send(topic, r.encode(), key=r.tenant_id.encode(), headers=r.headers()) for r in reqs]
        futs += [await p.send(topic, b, key=b"poison") for b in raw]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def interleaved(bootstrap: str, topic: str, items: list) -> None:
    """Produce InferRequests and raw bytes in the given order."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=5)
    await p.start()
    try:
        futs = []
        for it in items:
            if isinstance(it, InferRequest):
                futs.append(await p.send(topic, it.encode(), key=it.tenant_id.encode(), headers=it.headers()))
            else:
                futs.append(await p.send(topic, it, key=b"poison"))
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def collect(bootstrap: str, topic: str, until, timeout: float = 120.0, decode=True) -> list:
    """Read a topic from the start until ``until(records)`` is true (or time out: return what came)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    out: list = []
    try:
        parts = c.partitions_for_topic(topic)
        while not parts:
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic)
        c.assign([TopicPartition(topic, p) for p in parts])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(out):
            batch = await c.getmany(timeout_ms=300)
            for recs in batch.values():
                for r in recs:
                    out.append(InferReply.decode(r.value) if decode else r)
    finally:
        await c.stop()
    return out
