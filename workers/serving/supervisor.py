"""Several workers on one host from one command: `flockserve worker run --gpus all|N|0,1` starts one
worker process per GPU, `--replicas N` N CPU workers (tests, laptops), and supervises them.

Each child is a whole `flockserve worker run` (its engine, its edge processes, its agent and
leases) with its own CUDA_VISIBLE_DEVICES (it sees one GPU, as cuda:0), worker id
``<base>-gpu<ordinal>`` / ``<base>-r<i>`` (stable across restarts, so a restarted child takes up
its own registry row), HTTP port FLOCK_HTTP_PORT + i, and its share of the host's cores (torch
threads and "auto" edges); with static partitions, its contiguous run of them (with "leases"
the manager places them). A child that dies is restarted, backing off while it keeps dying
young; SIGTERM/SIGINT are passed to every child (each drains and hands its leases back) and the
supervisor exits when they have. Children die with the supervisor (PR_SET_PDEATHSIG: SIGTERM,
so they drain even then). The manager sees N independent workers: it balances between them by
their measured capacity (workers/serving/capacity.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from workers.config import Settings, follows_leases, parse_partitions
from workers.serving.group import edge_count

log = logging.getLogger("flock.supervisor")

QUICK_DEATH_S = 30.0  # a child that dies younger than this counts towards the back-off
MAX_BACKOFF_S = 30.0
# Settings a child must not inherit: it is one worker, not another supervisor.
_SUPERVISOR_ONLY = ("FLOCK_GPUS", "FLOCK_REPLICAS")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA names them for a child's CUDA_VISIBLE_DEVICES:
    the entries of our own CUDA_VISIBLE_DEVICES if set (indices or UUIDs), else 0..count-1."""
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
        count = 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()][:count]
    return [str(i) for i in range(count)]


def select_gpus(spec: str, visible: list[str]) -> list[tuple[int, str]]:
    """``spec``: "all", a count N (the first N), or ordinals "0,2" (cuda:N as this process sees
    them). Returns (ordinal, CUDA_VISIBLE_DEVICES entry) per worker. ValueError: a one-line reason."""
    spec = spec.strip().lower()
    if not visible:
        raise ValueError(f"--gpus {spec}: no GPU on this host (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --replicas N for CPU workers")
    if spec == "all":
        return list(enumerate(visible))
    try:
        if "," not in spec and spec.isdigit():
            n = int(spec)
            if not 1 <= n <= len(visible):
                raise ValueError(f"--gpus {n}: this host has {len(visible)} GPU(s)")
            return list(enumerate(visible))[:n]
        ordinals = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        if str(exc).startswith("--gpus"):
            raise
        raise ValueError(f'--gpus {spec}: expected "all", a count or ordinals like "0,1"') from None
    bad = [o for o in ordinals if not 0 <= o < len(visible)]
    if bad or not ordinals or len(set(ordinals)) != len(ordinals):
        raise ValueError(f"--gpus {spec}: ordinals must be distinct, in 0..{len(visible) - 1}")
    return [(o, visible[o]) for o in ordinals]


@dataclass
class Child:
    index: int
    name: str  # "gpu0", "r1": the worker id suffix and the log prefix
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0


def plan_children(s: Settings, gpus: list[tuple[int, str]] | None, replicas: int, environ: dict[str, str] | None = None,
                  cores: int | None = None) -> list[Child]:
    """The children's environments: one per GPU entry, or ``replicas`` CPU workers."""
    environ = dict(os.environ if environ is None else environ)
    for k in _SUPERVISOR_ONLY:
        environ.pop(k, None)
    n = len(gpus) if gpus else replicas
    base = environ.get("FLOCK_WORKER_ID") or socket.gethostname()
    static = None if follows_leases(s.partitions) else split_static(parse_partitions(s.partitions, s.request_partitions), n)
    share = max(1, (cores or os.cpu_count() or 1) // n)
    children = []
    for i in range(n):
        name = f"gpu{gpus[i][0]}" if gpus else f"r{i}"
        env = {**environ, "FLOCK_WORKER_ID": f"{base}-{name}",
               "FLOCK_HTTP_PORT": str(s.http_port + i if s.http_port else 0),
               # "auto" edges and torch threads from this child's share of the cores, not all of them
               "FLOCK_EDGES": str(edge_count(s.edges, cores=share)),
               "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(share))}
        if static is not None:
            env["FLOCK_PARTITIONS"] = ",".join(map(str, static[i]))
        if gpus:
            env.update(CUDA_VISIBLE_DEVICES=gpus[i][1], FLOCK_DEVICE="cuda")
        else:
            env.update(CUDA_VISIBLE_DEVICES="", FLOCK_DEVICE="cpu")
        children.append(Child(i, name, env))
    return children


def split_static(partitions: list[int], n: int) -> list[list[int]]:
    """Static assignment over n workers: contiguous, near-equal runs of the partition list (with
    FLOCK_PARTITIONS=leases the manager places them instead)."""
    if len(partitions) < n:
        raise ValueError(f"{len(partitions)} partitions cannot be split over {n} workers; use --partitions leases")
    per, extra = divmod(len(partitions), n)
    out, at = [], 0
    for i in range(n):
        k = per + (1 if i < extra else 0)
        out.append(partitions[at:at + k])
        at += k
    return out


def _die_with_parent() -> None:  # in the child, between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def backoff(quick_deaths: int) -> float:
    return min(MAX_BACKOFF_S, 0.5 * 2 ** quick_deaths)


class Supervisor:
    def __init__(self, children: list[Child], shutdown_timeout_s: float):
        self.children = children
        self.bound = shutdown_timeout_s + 15  # a child's own drain bound, plus its edges' and start-up
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._pumps: set[asyncio.Task] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for c in self.children:
            await self._spawn(c)
            self._tasks.append(asyncio.create_task(self._watch(c)))
        log.info("supervising %d workers: %s", len(self.children),
                 ", ".join(f"{c.env['FLOCK_WORKER_ID']} (pid {c.proc.pid}, device {c.env['FLOCK_DEVICE']}"
                           f"{' ' + c.env['CUDA_VISIBLE_DEVICES'] if c.env['CUDA_VISIBLE_DEVICES'] else ''})"
                           for c in self.children))
        await self.stopping.wait()
        log.info("stopping: SIGTERM to every worker (each drains and hands its leases back)")
        for c in self.children:
            self._signal(c, signal.SIGTERM)
        codes = await asyncio.gather(*(self._reap(c) for c in self.children))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._pumps, return_exceptions=True)
        return 0 if all(rc == 0 for rc in codes) else 1

    async def _spawn(self, c: Child) -> None:
        c.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.cli", "worker", "run", env=c.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # one worker = one process group (its engine and edges)
            preexec_fn=_die_with_parent)
        c.started = time.monotonic()
        t = asyncio.create_task(self._pump(c, c.proc.stdout))
        self._pumps.add(t)
        t.add_done_callback(self._pumps.discard)

    async def _pump(self, c: Child, stream: asyncio.StreamReader) -> None:
        """The child's output, each line prefixed with its name (one log for the host)."""
        prefix = f"[{c.name}] ".encode()
        out = sys.stdout.buffer
        while line := await stream.readline():
            out.write(prefix + line)
            out.flush()

    async def _watch(self, c: Child) -> None:
        while True:
            rc = await c.proc.wait()
            if self.stopping.is_set():
                return
            c.restarts += 1
            c.quick_deaths = c.quick_deaths + 1 if time.monotonic() - c.started < QUICK_DEATH_S else 0
            delay = backoff(c.quick_deaths)
            log.error("worker %s (pid %d) exited with %s; restarting it in %.1fs (its leases lapse or "
                      "it takes them up again; unacknowledged requests are replayed)",
                      c.env["FLOCK_WORKER_ID"], c.proc.pid, rc, delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                await self._spawn(c)

    def _signal(self, c: Child, sig: int) -> None:
        if c.proc is not None and c.proc.returncode is None:
            try:
                os.killpg(c.proc.pid, sig) if sig == signal.SIGKILL else c.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def _reap(self, c: Child) -> int:
        if c.proc is None:
            return 0
        try:
            return await asyncio.wait_for(c.proc.wait(), self.bound)
        except TimeoutError:
            log.warning("worker %s did not stop in %.0fs; killing it", c.env["FLOCK_WORKER_ID"], self.bound)
            self._signal(c, signal.SIGKILL)
            return await c.proc.wait()


def main(s: Settings, gpus: str | None, replicas: int) -> int:
    """Resolve the devices (ValueError: no GPU, a bad spec) and supervise until stopped."""
    if gpus and replicas:
        raise ValueError("--gpus and --replicas exclude each other")
    chosen = select_gpus(gpus, visible_gpus()) if gpus else None
    if not chosen and replicas < 1:
        raise ValueError(f"--replicas {replicas}: at least 1")
    children = plan_children(s, chosen, replicas)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(Supervisor(children, s.shutdown_timeout_s).run())
