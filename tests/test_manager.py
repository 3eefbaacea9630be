"""The control plane on the real services: 3 `flockserve worker run` processes following leases,
`flockserve manager` processes (leader + standby), real Kafka and PostgreSQL.

One module-scoped cluster, scenarios in order: skewed load is rebalanced by warm hand-overs
under load without losing a request; the leading manager is killed (data plane serves on, the
standby takes over); a worker is killed -9 (its partitions are served again within the lease
timeout, nothing lost); an operator drains a worker; a hot tenant is spread and the SDK follows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from schema.messages import ErrorCode, InferRequest
from schema.topics import partition_for
from tests.serving_harness import ROOT, WorkerProcess, collect, make_tenants, make_topics
from workers.kafka_admin import ensure_topics
from workers.kafka_conn import kafka_options
from workers.manager import pg
from workers.manager.leader import current_leader

pytestmark = pytest.mark.restarts  # kills managers and workers (about 2.5 min): `make test` only, not test-fast

PARTITIONS = 12
LEASE_TIMEOUT_S = 4.0
RATE_WINDOW_S = 4.0
CONTROL_ENV = {
    "FLOCK_HEARTBEAT_S": "0.5", "FLOCK_LEASE_POLL_S": "0.25", "FLOCK_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
    "FLOCK_WORKER_TIMEOUT_S": str(LEASE_TIMEOUT_S), "FLOCK_RATE_WINDOW_S": str(RATE_WINDOW_S),
    "FLOCK_MANAGER_TICK_S": "0.5", "FLOCK_HANDOVER_TIMEOUT_S": "8", "FLOCK_HANDOVER_DRAIN_S": "5",
    "FLOCK_REBALANCE_THRESHOLD": "1.2", "FLOCK_REBALANCE_TARGET": "1.08", "FLOCK_REBALANCE_MIN_DWELL_S": "3",
    "FLOCK_REBALANCE_COOLDOWN_S": "5", "FLOCK_REBALANCE_MAX_MOVES": "4",
    # Equal PET weights, so that the balanced quantity is the tokens/s the workers report.
    "FLOCK_PET_COST_WEIGHTS": json.dumps({k: 1.0 for k in ("lora", "adapter", "bitfit", "ia3", "diff", "maskbert")}),
    "FLOCK_HOT_TENANT_FACTOR": "1.5", "FLOCK_PARTITIONS": "leases", "FLOCK_BATCH_MAX_WAIT_MS": "5",
}
TEXT = "the central bank held rates steady while markets rallied"


class ManagerProcess:
    def __init__(self, env: dict[str, str], name: str):
        self.log_path = ROOT / ".flock" / "logs" / f"test-manager-{name}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagerProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "manager"], env=self.env,
                                     stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(30)
        return self.proc.returncode

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""


# ---------------------------------------------------------------- database views
async def _q(url: str, sql: str, *args):
    conn = await pg.connect(url, "flock-test")
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def leases(url: str, topic: str) -> dict[int, dict]:
    return {r["partition"]: r for r in asyncio.run(_q(url, "SELECT * FROM partition_leases WHERE topic = $1", topic))}


def workers(url: str, topic: str) -> dict[str, dict]:
    return {r["worker_id"]: r for r in asyncio.run(_q(url, "SELECT * FROM workers WHERE topic = $1", topic))}


def leader(url: str, topic: str) -> str | None:
    async def go():
        async with pg.session(url, "flock-test") as conn:
            return await current_leader(conn, topic)
    return asyncio.run(go())


def wait_for(what: str, cond, timeout: float, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def owners(url: str, topic: str) -> dict[int, str | None]:
    return {p: r["worker_id"] if r["state"] == "active" else None for p, r in leases(url, topic).items()}


# ---------------------------------------------------------------- load
async def open_loop(bootstrap: str, topic: str, rates: dict[str, float], seconds: float) -> list[InferRequest]:
    """Requests at fixed per-tenant rates (keyed by tenant: Kafka's hash picks the partition)."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options(), enable_idempotence=True, acks="all", linger_ms=5)
    await p.start()
    sent: list[InferRequest] = []
    futs = []
    try:
        start = time.monotonic()
        nxt = {t: start for t in rates if rates[t] > 0}
        while nxt:
            t, due = min(nxt.items(), key=lambda kv: kv[1])
            if due - start >= seconds:
                del nxt[t]
                continue
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            req = InferRequest(tenant_id=t, text=TEXT)
            futs.append(await p.send(topic, req.encode(), key=t.encode(), headers=req.headers()))
            sent.append(req)
            nxt[t] = due + 1.0 / rates[t]
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return sent


def all_replied(bootstrap: str, topics, sent: list[InferRequest], timeout: float = 90) -> Counter:
    want = {r.request_id for r in sent}
    replies = asyncio.run(collect(bootstrap, topics.replies, lambda rs: want <= {r.request_id for r in rs},
                                  timeout=timeout))
    got = Counter(r.request_id for r in replies if r.request_id in want)
    lost = want - set(got)
    assert not lost, f"{len(lost)} of {len(want)} requests never answered"
    assert all(r.status is ErrorCode.OK for r in replies if r.request_id in want)
    return got


# ---------------------------------------------------------------- cluster
@pytest.fixture(scope="module")
def tag():
    return f"m{int(time.time() * 1000) % 10**8}"


@pytest.fixture(scope="module")
def per_partition_tenants(sessions, tag):
    """One tenant hashing to each request partition (so load per partition is set exactly)."""
    chosen: dict[int, str] = {}
    j = 0
    while len(chosen) < PARTITIONS:
        name = f"{tag}x{j}-0"
        p = partition_for(name, PARTITIONS)
        if p not in chosen:
            make_tenants(sessions, f"{tag}x{j}", 1)
            chosen[p] = name
        j += 1
    return chosen


@pytest.fixture(scope="module")
def cluster(kafka_bootstrap, database_url, tag, per_partition_tenants):
    topics = asyncio.run(make_topics(kafka_bootstrap, tag, partitions=PARTITIONS))
    routing = f"routing.{tag}"
    asyncio.run(ensure_topics(kafka_bootstrap, {routing: (1, {"cleanup.policy": "compact"})}))
    env = {**CONTROL_ENV, "FLOCK_ROUTING_TOPIC": routing}
    ws = [WorkerProcess(database_url, topics, tag, **env) for _ in range(3)]
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda w: w.start(), ws))
    wait_for("3 registered workers", lambda: len(workers(database_url, topics.requests)) == 3, 30)
    menv = {**os.environ, **topics.env(), **env, "FLOCK_DATABASE_URL": database_url,
            "FLOCK_CONSUMER_GROUP": f"grp-{tag}"}
    managers = [ManagerProcess(menv, f"{tag}-a").start()]
    wait_for("a leading manager", lambda: leader(database_url, topics.requests), 30)
    managers.append(ManagerProcess(menv, f"{tag}-b").start())  # the standby
    state = {"topics": topics, "workers": ws, "managers": managers, "routing": routing, "env": menv}
    yield state
    for m in managers:
        if m.proc.poll() is None:
            m.terminate()
    for w in ws:
        if w.proc.poll() is None:
            assert w.terminate() == 0, w.log_tail()


def _live(cluster):
    return [w for w in cluster["workers"] if w.proc.poll() is None]


# ---------------------------------------------------------------- scenarios
def test_leases_spread_over_workers_then_skew_is_rebalanced_under_load(kafka_bootstrap, database_url, cluster,
                                                                       per_partition_tenants):
    topics = cluster["topics"]
    ids = {w.env["FLOCK_WORKER_ID"] for w in cluster["workers"]}
    own = wait_for("every partition leased", lambda: (o := owners(database_url, topics.requests))
                   and all(o.get(p) for p in range(PARTITIONS)) and o, 30)
    assert set(own.values()) == ids and sorted(Counter(own.values()).values()) == [4, 4, 4]

    # All load on the first worker's partitions (plus a little elsewhere): imbalance ~1.9.
    hot_worker = sorted(ids)[0]
    heavy = [12, 10, 8, 6]
    rates, i = {}, 0
    for p in range(PARTITIONS):
        if own[p] == hot_worker:
            rates[per_partition_tenants[p]] = heavy[i]
            i += 1
        else:
            rates[per_partition_tenants[p]] = 3.0 if p % 2 else 2.0
    total = sum(rates.values())

    result: dict = {}

    def measured_ratio() -> float | None:
        ls = leases(database_url, topics.requests)
        if any(r["next_worker_id"] or r["state"] != "active" for r in ls.values()):
            return None  # a hand-over is under way
        ws = workers(database_url, topics.requests)
        load = Counter()
        for p, r in ls.items():
            rep = ws[r["worker_id"]]["metrics"].get("partitions", {}).get(str(p))
            if rep is None:
                return None
            load[r["worker_id"]] += rep["tokens_per_s"]
        newest_move = min(time.time() - r["assigned_at"].timestamp() for r in ls.values())
        if newest_move < RATE_WINDOW_S + 1:
            return None  # the new owner's rate window is not full yet
        vals = [load[w] for w in ws if ws[w]["state"] == "serving"]
        return max(vals) / (sum(vals) / len(vals)) if sum(vals) else None

    async def drive():
        load = asyncio.create_task(open_loop(kafka_bootstrap, topics.requests, rates, seconds=45))
        deadline = time.monotonic() + 44
        ratios = []
        while time.monotonic() < deadline and not load.done():
            await asyncio.sleep(1)
            r = await asyncio.to_thread(measured_ratio)
            if r is not None:
                ratios.append(round(r, 3))
                if r <= 1.2 and len(await asyncio.to_thread(_moves, database_url, topics.requests)) > 0:
                    result["balanced"] = r
                    break
        result["ratios"] = ratios
        result["sent"] = await load

    asyncio.run(drive())
    moves = _moves(database_url, topics.requests)
    print(f"skew: {total} req/s, ratios seen {result['ratios']}, moves {moves}")
    assert moves, "the manager never rebalanced"
    assert "balanced" in result, f"max/mean worker load never <= 1.2: {result['ratios']}"
    assert moves[0]["detail"]["imbalance_before"] > 1.5  # the skew was real, as measured by the manager
    # Hand-overs happened under load: every request answered.
    got = all_replied(kafka_bootstrap, topics, result["sent"])
    dups = sum(c - 1 for c in got.values())
    print(f"hand-over under load: {len(result['sent'])} requests, {dups} duplicates")
    assert dups <= len(moves) * 64  # at most the in-flight work of each moved partition


def _moves(url: str, topic: str) -> list[dict]:
    return asyncio.run(_q(url, "SELECT kind, subject, detail FROM audit_events WHERE kind = 'lease.balance' "
                               "AND subject LIKE $1 ORDER BY id", f"{topic}/%"))


def test_manager_killed_data_plane_serves_on_and_standby_takes_over(kafka_bootstrap, database_url, cluster,
                                                                     per_partition_tenants):
    topics = cluster["topics"]
    first, standby = cluster["managers"]
    before = leader(database_url, topics.requests)
    assert before and before.endswith(str(first.proc.pid)), before
    epochs = {p: r["epoch"] for p, r in leases(database_url, topics.requests).items()}
    first.kill9()
    t_kill = time.monotonic()
    # No manager for a moment: requests are still answered by the lease holders.
    sent = asyncio.run(open_loop(kafka_bootstrap, topics.requests,
                                 {t: 2.0 for t in per_partition_tenants.values()}, seconds=3))
    all_replied(kafka_bootstrap, topics, sent, timeout=60)
    now = wait_for("the standby to lead", lambda: (l := leader(database_url, topics.requests))
                   and l.endswith(str(standby.proc.pid)) and l, 20)
    print(f"standby leads {time.monotonic() - t_kill:.1f}s after kill -9 of the leader")
    assert now != before
    # Leases did not churn because the manager died.
    assert {p: r["epoch"] for p, r in leases(database_url, topics.requests).items()} == epochs


def test_worker_kill9_partitions_served_again_within_lease_timeout(kafka_bootstrap, database_url, cluster,
                                                                   per_partition_tenants):
    topics = cluster["topics"]
    victim = _live(cluster)[-1]
    vid = victim.env["FLOCK_WORKER_ID"]
    theirs = [p for p, w in owners(database_url, topics.requests).items() if w == vid]
    assert theirs, "the victim holds no partition"
    rates = {t: 3.0 for t in per_partition_tenants.values()}

    async def drive():
        load = asyncio.create_task(open_loop(kafka_bootstrap, topics.requests, rates, seconds=12))
        await asyncio.sleep(2)
        await asyncio.to_thread(victim.kill9)
        t_kill = time.monotonic()

        def taken_over():
            o = owners(database_url, topics.requests)
            return all(o.get(p) not in (None, vid) for p in theirs)
        while not await asyncio.to_thread(taken_over):
            await asyncio.sleep(0.1)
        took = time.monotonic() - t_kill
        return took, await load

    took, sent = asyncio.run(drive())
    print(f"kill -9: partitions {theirs} re-leased {took:.1f}s after the kill (lease timeout {LEASE_TIMEOUT_S}s)")
    assert took <= LEASE_TIMEOUT_S + 1.5  # expiry + one manager tick + NOTIFY
    got = all_replied(kafka_bootstrap, topics, sent)
    assert workers(database_url, topics.requests)[vid]["state"] == "dead"
    print(f"kill -9 under load: {len(sent)} requests, {sum(c - 1 for c in got.values())} duplicates")


def _cli(env, *args):
    p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                       env={**env, "COLUMNS": "250"}, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_drain_moves_everything_off_and_status_shows_it(kafka_bootstrap, database_url, cluster,
                                                       per_partition_tenants):
    topics = cluster["topics"]
    live = _live(cluster)
    assert len(live) == 2
    victim = live[0].env["FLOCK_WORKER_ID"]
    _cli(cluster["env"], "worker", "drain", victim)
    sent = asyncio.run(open_loop(kafka_bootstrap, topics.requests, {t: 2.0 for t in per_partition_tenants.values()},
                                 seconds=2))
    wait_for("the drained worker to hold nothing",
             lambda: all(w not in (victim, None) for w in owners(database_url, topics.requests).values()), 30)
    all_replied(kafka_bootstrap, topics, sent)
    st = json.loads(_cli(cluster["env"], "status", "--json"))
    assert st["leader"] and {w["worker_id"]: w["state"] for w in st["workers"]}[victim] == "draining"
    assert all(l["worker_id"] != victim and l["lag"] is not None for l in st["leases"])
    human = _cli(cluster["env"], "status")
    assert "partition leases" in human and victim in human
    plan = json.loads(_cli(cluster["env"], "rebalance", "--json"))
    assert plan["applied"] is False and "imbalance_before" in plan
    _cli(cluster["env"], "worker", "drain", victim, "--undo")
    applied = json.loads(_cli(cluster["env"], "rebalance", "--apply", "--force", "--json"))
    assert applied["applied"] is True and all(m["started"] in (True, False) for m in applied["moves"])
    assert applied["imbalance_after"] <= applied["imbalance_before"] + 1e-9


def test_hot_tenant_is_spread_and_the_client_follows_the_route(kafka_bootstrap, database_url, cluster,
                                                               per_partition_tenants):
    from workers.client import FlockClient

    topics = cluster["topics"]
    whale = per_partition_tenants[0]
    rates = {t: 0.5 for t in per_partition_tenants.values()}
    rates[whale] = 12.0
    # The whale stays hot for the whole test: a route is dropped once its tenant cools down, and
    # the checks below (client, tenant show) must see the tenant while it is hot.
    import concurrent.futures
    loader = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: asyncio.run(open_loop(kafka_bootstrap, topics.requests, rates, seconds=45)))
    route = wait_for("a route for the hot tenant", lambda: (r := asyncio.run(_q(
        database_url, "SELECT partitions FROM tenant_routes WHERE tenant_id = $1", whale))) and r[0]["partitions"], 30)
    assert len(route) >= 2 and 0 in route

    async def via_client():
        async with FlockClient(kafka_bootstrap, requests_topic=topics.requests, reply_topic=topics.replies,
                               routing_topic=cluster["routing"]) as c:
            followed = c.routing.routes.get(whale)
            assert followed
            futs = [await c.submit(c.request(whale, TEXT, timeout=60)) for _ in range(30)]
            return list(followed), await asyncio.gather(*futs)
    followed, replies = asyncio.run(via_client())
    assert all(r.status is ErrorCode.OK for r in replies)
    # The requests really went to the route's partitions: exactly their lease holders answered
    # (one worker when the balancer happened to give it every partition of the route).
    leases = asyncio.run(_q(database_url, "SELECT partition, worker_id FROM partition_leases WHERE topic = $1",
                            topics.requests))
    holders = {r["worker_id"] for r in leases if r["partition"] in followed}
    assert len(followed) >= 2 and {r.worker_id for r in replies} == holders, (followed, leases)
    st = json.loads(_cli(cluster["env"], "tenant", "show", whale, "--json"))
    assert st["serving"]["spread"] and len(st["serving"]["partitions"]) >= 2
    assert st["serving"]["home_partition"] == 0 and 0 in [p["partition"] for p in st["serving"]["partitions"]]
    assert all(p["worker_id"] for p in st["serving"]["partitions"])  # each partition of the route has an owner
    all_replied(kafka_bootstrap, topics, loader.result())
