"""scripts/services from a checkout the `postgres` account cannot enter (a clone under /root, whose
home is 0700, or a `mktemp -d` folder): real Kafka and PostgreSQL on ports of their own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _copy_checkout(dest: Path) -> None:
    """The working tree's tracked files (what a clone would hold, with uncommitted edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture()
def private_checkout():
    tmp = Path(tempfile.mkdtemp(prefix="flock-0700-"))  # mode 0700, like /root
    assert (tmp.stat().st_mode & 0o777) == 0o700
    checkout = tmp / "flock"
    _copy_checkout(checkout)
    kafka, ctl, pg = _free_ports(3)
    # Reuse the jar cache of the services this test session runs on: no second Maven fetch.
    jars = os.environ.get("FLOCK_KAFKA_LIBS") or str(
        Path(os.environ.get("FLOCK_STATE_DIR") or ROOT / ".flock") / "kafka" / "libs")
    env = {**os.environ, "FLOCK_KAFKA_PORT": str(kafka), "FLOCK_KAFKA_CONTROLLER_PORT": str(ctl),
           "FLOCK_PG_PORT": str(pg), "FLOCK_STATE_DIR": str(checkout / ".flock"), "FLOCK_KAFKA_LIBS": jars}

    def services(*args: str) -> str:
        p = subprocess.run([str(checkout / "scripts" / "services"), *args], cwd=checkout, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"services {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        return p.stdout

    yield checkout, services, kafka, pg
    location = checkout / ".flock" / "pg" / "location"
    subprocess.run([str(checkout / "scripts" / "services"), "down"], cwd=checkout, env=env,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if location.exists():  # the cluster kept outside the checkout belongs to this test only
        shutil.rmtree(location.read_text().strip(), ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _pg_answers(port: int) -> int:
    with psycopg2.connect(host="127.0.0.1", port=port, user="flock", password="flock", dbname="flock",
                          connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("select 1")
        return cur.fetchone()[0]


def _status_line(status: str, service: str) -> str:
    return next(line for line in status.splitlines() if line.startswith(service + ":"))


def test_services_up_status_restart_down_from_a_0700_checkout(private_checkout):
    checkout, services, kafka_port, pg_port = private_checkout
    services("up")
    assert _pg_answers(pg_port) == 1
    with socket.create_connection(("127.0.0.1", kafka_port), timeout=5):
        pass

    status = services("status")
    pg_line = _status_line(status, "postgres")
    assert pg_line.split()[1] == "running" and f"127.0.0.1:{pg_port}" in pg_line, status
    assert _status_line(status, "kafka").split()[1] == "running", status
    data_dir = Path(pg_line.split(" data ")[1].strip())
    assert (data_dir / "PG_VERSION").is_file(), status
    if os.geteuid() == 0:
        # The server runs as `postgres`, which cannot enter the checkout: the cluster lives in a
        # postgres-owned directory outside it, recorded in the state dir.
        assert not data_dir.is_relative_to(checkout), status
        assert (checkout / ".flock" / "pg" / "location").read_text().strip() == str(data_dir.parent)

    # Later commands find the relocated cluster again.
    services("pg-stop")
    assert _status_line(services("status"), "postgres").split()[1] == "stopped"
    services("pg-start")
    assert _pg_answers(pg_port) == 1
    assert f" data {data_dir}" in _status_line(services("status"), "postgres")
    assert "database system is ready to accept connections" in services("logs")

    services("down")
    status = services("status")
    assert _status_line(status, "postgres").split()[1] == "stopped", status
    assert _status_line(status, "kafka").split()[1] == "stopped", status
    with pytest.raises(psycopg2.OperationalError):
        _pg_answers(pg_port)
