"""Heartbeats stay bounded with many tenants: the load window keeps a partition's exact totals but
only its heaviest tenants per sample, the report names top-K per partition and at most
RESIDENT_LISTED resident tenants, and the heavy hitters are the right ones. No services: the
report is what the agent writes into ``workers.metrics``."""

from __future__ import annotations

import asyncio
import json
import random

from workers.config import Settings
from workers.manager.agent import RESIDENT_LISTED, WorkerAgent
from workers.manager.rates import LoadWindow

PARTITIONS = 12
BEATS = 8  # heartbeats inside the window
BEAT_S = 2.0


class _Worker:
    """The agent's view of a serving worker: counts since the last take_load()."""

    def __init__(self, tenants: int, seed: int = 0):
        self.stopping = asyncio.Event()
        self.owned = {p: 1 for p in range(PARTITIONS)}
        self.names = [f"tenant-{i:06d}-{'x' * 40}" for i in range(tenants)]  # long ids: worst-case size
        self.weights = [1.0 / (i + 1) for i in range(tenants)]  # Zipf(1.0)
        self.rng = random.Random(seed)
        self.requests = 40 * tenants // 10 + 2000  # per beat: every tenant shows up at all scales
        self.sent = 0

    def take_load(self):
        counts: dict[int, dict[str, list[int]]] = {}
        for i in self.rng.choices(range(len(self.names)), self.weights, k=self.requests):
            c = counts.setdefault(i % PARTITIONS, {}).setdefault(self.names[i], [0, 0])
            c[0] += 1
            c[1] += 32
        self.sent += self.requests
        return {"counts": counts, "highwater": {p: self.sent for p in self.owned}, "lag": dict.fromkeys(self.owned, 0),
                "queue_depth": 0, "inflight": 0, "owned": dict(self.owned), "releasing": []}


def _beats(tenants: int, exact: LoadWindow | None = None) -> tuple[WorkerAgent, dict]:
    worker = _Worker(tenants)
    resident = worker.names[:10_000]
    # an engine that lists far more residents than a heartbeat may carry
    agent = WorkerAgent(Settings(partitions="leases"), worker,
                        engine_stats=lambda: {"resident_tenants": list(resident), "resident_count": len(resident),
                                              "free_adapter_bytes": 1 << 30, "device_kind": "cpu"})
    report = {}
    for b in range(BEATS):
        now = 1000.0 + b * BEAT_S
        if exact is not None:
            take = worker.take_load
            load = take()
            worker.take_load = lambda load=load: load
            exact.add(now, load["counts"], load["highwater"], list(load["owned"]))
            report = agent.load_report(now)
            worker.take_load = take
        else:
            report = agent.load_report(now)
    return agent, report


def _bound(top: int) -> int:
    """Bytes a report may take, from the caps alone (63-character tenant ids, a number each)."""
    per_tenant = 63 + 4 + 16
    return PARTITIONS * (top * per_tenant + 300) + RESIDENT_LISTED * (63 + 4) + 1000


def test_heartbeat_size_does_not_grow_with_tenants():
    sizes = {}
    for n in (500, 5_000, 20_000):
        agent, report = _beats(n)
        sizes[n] = len(json.dumps(report))
        assert sizes[n] < _bound(agent.window.top_tenants), (n, sizes[n])
        assert report["resident_count"] == min(n, 10_000)
        assert len(report["resident_tenants"]) == min(n, RESIDENT_LISTED)
        assert all(len(p["tenants"]) <= agent.window.top_tenants for p in report["partitions"].values())
        # the window's own memory: samples x partitions x keep, not tenants
        assert agent.window.held_tenants() <= BEATS * PARTITIONS * agent.window.keep
    assert sizes[20_000] < 1.1 * sizes[5_000], sizes


def test_heavy_hitters_and_totals_match_an_uncapped_window():
    exact = LoadWindow(Settings().rate_window_s, top_tenants=10 ** 9, keep=10 ** 9)  # every tenant, uncut
    agent, report = _beats(20_000, exact)
    truth = exact.report(1000.0 + (BEATS - 1) * BEAT_S)
    assert report["partitions"].keys() == truth["partitions"].keys()
    for p, got in report["partitions"].items():
        want = truth["partitions"][p]
        # totals are exact whatever the cut
        assert got["requests_per_s"] == want["requests_per_s"]
        assert got["tokens_per_s"] == want["tokens_per_s"]
        assert got["active_tenants"] > agent.window.keep  # the cut really happened
        # the heavy hitters: a true top-K (ties may break either way) with the exact rates
        full = want["tenants"]
        assert len(got["tenants"]) == agent.window.top_tenants
        assert all(full[t] == r for t, r in got["tenants"].items())
        assert min(got["tenants"].values()) >= max(r for t, r in full.items() if t not in got["tenants"])
    assert report["requests_per_s"] == truth["requests_per_s"]
    # Zipf over 12 partitions: the globally heaviest tenants are in their partitions' top-K
    reported = {t for p in report["partitions"].values() for t in p["tenants"]}
    names = _Worker(20_000).names
    assert set(names[:PARTITIONS * 5]) <= reported


def test_a_tenant_heavy_in_one_beat_only_is_still_counted_when_in_the_cut():
    w = LoadWindow(window_s=30, top_tenants=2, keep=3)
    w.add(0.0, {0: {"a": [1, 100], "b": [1, 90], "c": [1, 80], "d": [1, 1]}}, {0: 0}, [0])
    w.add(2.0, {0: {"a": [1, 100], "d": [1, 1], "e": [1, 2], "f": [1, 3]}}, {0: 4}, [0])
    rep = w.report(2.0)["partitions"]["0"]
    assert list(rep["tenants"]) == ["a", "b"]
    assert rep["requests_per_s"] == round(8 / 2.0, 3)  # the cut tenants still count in the totals
    assert rep["tokens_per_s"] == round(377 / 2.0, 3)
    assert w.held_tenants() == 6


def test_observe_reads_pet_types_of_reported_tenants_only(sessions, database_url, unique):
    """The manager's tick asks PostgreSQL about the tenants the reports name, not all 3,000."""
    from sqlalchemy import event

    from schema.tables import Adapter, Tenant, Worker, WorkerState
    from workers.manager import pg
    from workers.manager.state import observe, pet_types_of

    ids = [f"r{unique}-{i:04d}" for i in range(3000)]
    with sessions.begin() as s:
        s.execute(Tenant.__table__.insert(), [{"tenant_id": t, "active_version": 1} for t in ids])
        s.execute(Adapter.__table__.insert(), [{"tenant_id": t, "version": 1, "pet_type": ("lora", "ia3")[i % 2],
                                                "config": {}, "base_model_id": "m", "sha256": "0" * 64,
                                                "size_bytes": 1} for i, t in enumerate(ids)])
    topic = f"rates-{unique}"
    worker = _Worker(0)
    worker.names = ids
    report = {"partitions": {"0": {"tenants": {ids[0]: 5.0, ids[1]: 3.0}}, "1": {"tenants": {ids[7]: 1.0}}}}
    with sessions.begin() as s:
        s.execute(Worker.__table__.insert().values(worker_id=f"w-{unique}", host="h", device="cpu",
                                                   state=WorkerState.SERVING, metrics=report, topic=topic))

    async def go():
        rows: list[int] = []
        async with pg.session(database_url, "test-rates") as conn:
            event.listen(conn.sync_engine, "after_cursor_execute",
                         lambda c, cur, stmt, *a: rows.append(cur.rowcount) if "pet_type" in stmt else None)
            obs = await observe(conn, topic)
            routed = await pet_types_of(conn, [ids[9], "no-such-tenant"])
        return obs, routed, rows

    obs, routed, rows = asyncio.run(go())
    assert obs.pet_types == {ids[0]: "lora", ids[1]: "ia3", ids[7]: "ia3"}
    assert routed == {ids[9]: "ia3"}
    assert rows == [3, 1]  # rows read: what was asked for, never the 3,000
