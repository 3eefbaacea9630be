"""The `flockserve` console script as a user runs it: tables, --json, typed failures, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.adapter_factory import make_peft_lora


@pytest.fixture()
def cli(database_url, tmp_path):
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url, "FLOCK_STORE_DIR": str(tmp_path / "blobs"),
           "COLUMNS": "200"}

    def run(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                           env=env, timeout=180, stdin=subprocess.DEVNULL)
        if ok:
            assert p.returncode == 0, p.stderr
        return p
    return run


def test_tenant_lifecycle(cli, unique):
    t = f"cli-{unique}"
    created = cli("tenant", "create", t, "--name", "CLI test")
    assert t in created.stdout and "CLI test" in created.stdout
    listed = json.loads(cli("tenant", "list", "--prefix", t, "--json").stdout)
    assert [r["tenant_id"] for r in listed["tenants"]] == [t] and listed["next_after"] is None
    shown = json.loads(cli("tenant", "show", t, "--json").stdout)
    assert shown["tenant_id"] == t and shown["active_version"] is None and shown["adapter_versions"] == []
    dup = cli("tenant", "create", t, ok=False)
    assert dup.returncode == 1 and dup.stderr.strip() == f"error: tenant '{t}' already exists"
    cli("tenant", "delete", t, "--yes")
    gone = cli("tenant", "show", t, ok=False)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_bad_input_exits_nonzero_with_one_line(cli, unique, tmp_path):
    p = cli("tenant", "create", "Bad Id!", ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "must match" in p.stderr
    p = cli("adapter", "import", "nobody", str(tmp_path), ok=False)
    assert p.returncode == 1 and "neither" in p.stderr
    p = cli("tenant", "frobnicate", ok=False)
    assert p.returncode == 2


def test_peft_import_and_list(cli, unique, minilm_dir, tmp_path):
    t = f"peft-{unique}"
    cli("tenant", "create", t)
    d = make_peft_lora(minilm_dir, tmp_path / "lora", r=8, labels=2, targets=("query", "key", "value"))
    rec = json.loads(cli("adapter", "import", t, str(d), "--labels", "spam,ham", "--json").stdout)
    assert rec["version"] == 1 and rec["pet_type"] == "lora" and rec["config"]["labels"] == ["spam", "ham"]
    assert rec["config"]["sites"] == ["k", "q", "v"]
    rows = json.loads(cli("adapter", "list", "--tenant", t, "--json").stdout)
    assert [r["version"] for r in rows] == [1]
    table = cli("adapter", "list", "--tenant", t).stdout
    assert t in table and "lora" in table
    wrong = cli("adapter", "import", t, str(d), "--labels", "a,b,c", ok=False)
    assert wrong.returncode == 1 and "3 labels given but the head has 2 outputs" in wrong.stderr


def test_db_current_reports_head(cli):
    info = json.loads(cli("db", "current", "--json").stdout)
    assert info["up_to_date"] and info["current"] == info["head"]


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [("status",), ("worker", "drain", "w1"), ("rebalance",), ("tenant", "list"),
                                  ("topics", "create"), ("send", "t1", "hello"),
                                  ("load", "--tenants", "t1", "--count", "1")])
def test_unreachable_services_give_one_error_line(args):
    port = _closed_port()
    env = {**os.environ, "FLOCK_DATABASE_URL": f"postgresql://flock:flock@127.0.0.1:{port}/flock",
           "FLOCK_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert str(port) in p.stderr or "refused" in p.stderr.lower(), p.stderr


def test_worker_run_is_the_command_and_bare_worker_still_parses():
    run = subprocess.run([sys.executable, "-m", "workers.cli", "worker", "run", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0 and "--partitions" in run.stdout
    group = subprocess.run([sys.executable, "-m", "workers.cli", "worker", "--help"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert group.returncode == 0 and "run" in group.stdout and "drain" in group.stdout
