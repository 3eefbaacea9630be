"""A real Flock cluster for one scenario: its own topics and tenants, a manager (or two) and
workers as separate processes, following leases; plus the levers to break it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from sqlalchemy import create_engine, text

from tests.serving_harness import ROOT, WorkerProcess, make_tenants, make_topics
from workers.config import sync_database_url
from workers.db import session_factory

# Short control-plane timings so that take-overs happen within a scenario.
FAST_CONTROL = {"FLOCK_PARTITIONS": "leases", "FLOCK_HEARTBEAT_S": "0.5", "FLOCK_LEASE_POLL_S": "0.3",
                "FLOCK_LEASE_TIMEOUT_S": "4", "FLOCK_WORKER_TIMEOUT_S": "4", "FLOCK_MANAGER_TICK_S": "0.5",
                "FLOCK_REBALANCE_MIN_DWELL_S": "5", "FLOCK_REBALANCE_COOLDOWN_S": "5",
                "FLOCK_HANDOVER_DRAIN_S": "5", "FLOCK_HANDOVER_TIMEOUT_S": "15", "FLOCK_RATE_WINDOW_S": "5"}


class ManagerProcess:
    def __init__(self, env: dict[str, str], name: str):
        self.env = env
        self.log_path = ROOT / ".flock" / "logs" / f"faults-manager-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "manager"], env=self.env,
                                     stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


class Cluster:
    def __init__(self, database_url: str, bootstrap: str, tag: str, *, workers: int = 2, managers: int = 1,
                 tenants: int = 16, partitions: int = 6, worker_env: dict[str, str] | None = None,
                 keys: bool = False):
        self.database_url, self.bootstrap, self.tag = database_url, bootstrap, tag
        self.n_workers, self.n_managers, self.n_tenants, self.partitions = workers, managers, tenants, partitions
        self.worker_env = worker_env or {}
        self.workers: list[WorkerProcess] = []
        self.managers: list[ManagerProcess] = []
        self.topics = None
        self.tenants: list[str] = []
        self.with_keys = keys  # one signing key per tenant, made before the workers start
        self.keys: dict[str, tuple[str, bytes]] = {}  # tenant -> (key_id, secret)

    def setup(self) -> "Cluster":
        self.topics = asyncio.run(make_topics(self.bootstrap, self.tag, partitions=self.partitions))
        self.tenants = make_tenants(session_factory(self.database_url), self.tag, self.n_tenants)
        if self.with_keys:
            from workers.auth import TenantKeys, decode_key
            tk = TenantKeys(session_factory(self.database_url))
            self.keys = {t: decode_key(tk.create(t)[1]) for t in self.tenants}
        env = {**os.environ, **self.topics.env(), **FAST_CONTROL, "FLOCK_DATABASE_URL": self.database_url,
               "FLOCK_KAFKA_BOOTSTRAP": self.bootstrap, "FLOCK_CONSUMER_GROUP": f"grp-{self.tag}"}
        for i in range(self.n_managers):
            self.managers.append(ManagerProcess(env, f"{self.tag}-{i}").start())
        for i in range(self.n_workers):
            self.workers.append(self._worker(i))
        for w in self.workers:
            w.start()
        self.wait_all_leased()
        return self

    def _worker(self, i: int, **extra: str) -> WorkerProcess:
        # One consumer group for the whole cluster: a partition's next owner reads its offsets.
        env = {**FAST_CONTROL, "FLOCK_KAFKA_BOOTSTRAP": self.bootstrap, "FLOCK_CONSUMER_GROUP": f"grp-{self.tag}",
               **self.worker_env, **extra}
        w = WorkerProcess(self.database_url, self.topics, f"{self.tag}-{i}", **env)
        w.env["FLOCK_WORKER_ID"] = f"{self.tag}-w{i}"
        return w

    def replace_worker(self, i: int, **extra: str) -> WorkerProcess:
        """A fresh process in slot i (same worker id: a restart), started and ready. A previous
        process still running there is stopped first (SIGTERM: a clean hand-back)."""
        old = self.workers[i]
        if old.proc is not None and old.proc.poll() is None:
            old.terminate(60)
        self.workers[i] = self._worker(i, **extra)
        return self.workers[i].start()

    def leased(self) -> dict[int, str | None]:
        e = create_engine(sync_database_url(self.database_url))
        try:
            with e.connect() as c:
                rows = c.execute(text("SELECT partition, worker_id FROM partition_leases WHERE topic = :t "
                                      "AND state = 'active'"), {"t": self.topics.requests}).all()
        finally:
            e.dispose()
        return {p: w for p, w in rows}

    def wait_all_leased(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            owners = self.leased()
            if len([p for p, w in owners.items() if w]) == self.partitions:
                return
            time.sleep(0.5)
        raise AssertionError(f"partitions not all leased after {timeout}s: {self.leased()}")

    def teardown(self) -> None:
        for w in self.workers:
            try:
                w.terminate(60)
            except AssertionError:
                pass
        for m in self.managers:
            m.terminate()


def services(*args: str) -> None:
    """Drive scripts/services (the local Kafka/PostgreSQL) for broker and database faults."""
    subprocess.run([str(ROOT / "scripts" / "services"), *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)

