"""Several workers on one host from one command (`flockserve worker run --gpus/--replicas`,
workers/serving/supervisor.py) and the capacity each measures at start (workers/serving/capacity.py).

This host has no GPU: `--gpus` is checked for its one-line refusal and its plan; the supervised
system runs as `--replicas 2` CPU workers (the same code path, CUDA_VISIBLE_DEVICES aside) on the
real Kafka and PostgreSQL, with a real manager: kill -9 of one worker under load (its partitions
are re-leased to the other, the supervisor restarts it, nothing is lost), then a drain of the
other (its partitions move by warm hand-over, hot tenants prefetched), then SIGTERM of the
supervisor (every worker stops cleanly).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.config import Settings
from workers.serving.supervisor import plan_children, select_gpus, split_static

# ---------------------------------------------------------------- the plan (no services)


def test_gpu_selection_all_count_ordinals_and_refusals():
    vis = ["0", "1", "2", "3"]
    assert select_gpus("all", vis) == [(0, "0"), (1, "1"), (2, "2"), (3, "3")]
    assert select_gpus("2", vis) == [(0, "0"), (1, "1")]
    assert select_gpus("1,3", ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]) == [(1, "GPU-b"), (3, "GPU-d")]
    for bad, why in (("5", "has 4 GPU"), ("0", "has 4 GPU"), ("1,1", "distinct"), ("0,4", "distinct"),
                     ("x", "expected")):
        with pytest.raises(ValueError, match=why):
            select_gpus(bad, vis)
    with pytest.raises(ValueError, match="no GPU on this host"):
        select_gpus("all", [])


def test_children_get_a_device_an_id_a_port_a_core_share_and_static_partitions_each():
    s = Settings(http_port=9400, edges="auto", partitions="all", request_partitions=12)
    env = {"FLOCK_WORKER_ID": "host7", "FLOCK_GPUS": "all", "FLOCK_REPLICAS": "2", "PATH": "/bin"}
    kids = plan_children(s, [(0, "0"), (2, "GPU-x")], 0, environ=env, cores=16)
    assert [c.env["FLOCK_WORKER_ID"] for c in kids] == ["host7-gpu0", "host7-gpu2"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in kids] == ["0", "GPU-x"]
    assert {c.env["FLOCK_DEVICE"] for c in kids} == {"cuda"}
    assert [c.env["FLOCK_HTTP_PORT"] for c in kids] == ["9400", "9401"]
    assert [c.env["FLOCK_PARTITIONS"] for c in kids] == ["0,1,2,3,4,5", "6,7,8,9,10,11"]
    # 8 cores each: 7 edges ("auto" = cores - 1) and 8 torch threads, not 15 and 16 per child
    assert [(c.env["FLOCK_EDGES"], c.env["OMP_NUM_THREADS"]) for c in kids] == [("7", "8"), ("7", "8")]
    assert all("FLOCK_GPUS" not in c.env and "FLOCK_REPLICAS" not in c.env for c in kids)  # no recursion

    cpu = plan_children(Settings(http_port=0, partitions="leases"), None, 3, environ={"PATH": "/bin"}, cores=2)
    assert [c.name for c in cpu] == ["r0", "r1", "r2"]
    assert {(c.env["FLOCK_DEVICE"], c.env["CUDA_VISIBLE_DEVICES"], c.env["FLOCK_HTTP_PORT"]) for c in cpu} == \
        {("cpu", "", "0")}
    assert all("FLOCK_PARTITIONS" not in c.env for c in cpu)  # leases: the manager places them
    assert split_static([0, 1, 2, 3, 4], 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="cannot be split"):
        split_static([0], 2)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, env, message", [
    (["--gpus", "all"], {}, "error: --gpus all: no GPU on this host"),
    ([], {"FLOCK_GPUS": "2"}, "error: --gpus 2: no GPU on this host"),
    (["--gpus", "all", "--replicas", "2"], {}, "error: --gpus and --replicas exclude each other"),
    (["--replicas", "2", "--device", "cuda"], {}, "error: --device cuda with --replicas"),
])
def test_bad_multi_worker_requests_are_one_error_line(args, env, message):
    p = _cli("worker", "run", *args, env=env)
    assert p.returncode == 2 and p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr


def test_capacity_is_measured_from_the_engine(minilm_dir):
    from workers.engine.runtime import Engine
    from workers.serving.capacity import SHAPES, measure_capacity

    engine = Engine(str(minilm_dir), lambda t: None, device="cpu")
    try:
        t0 = time.perf_counter()
        cap = measure_capacity(engine, budget_s=0.2)
        took = time.perf_counter() - t0
    finally:
        engine.close()
    seqs, length = SHAPES["cpu"]
    # thousands of tokens/s: at least the timed passes' tokens over the whole call
    assert cap >= 3 * seqs * length / took / 1e3 * 0.99 > 0
    assert took < 30
