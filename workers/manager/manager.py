"""`flockserve manager`: the control-plane loop. Stand by until leading, then every tick:

1. make sure every request partition has a lease row;
2. failure take-over: mark silent workers dead, take back lapsed leases (epoch + 1);
3. settle hand-overs stuck past FLOCK_HANDOVER_TIMEOUT_S (cancel, or force with epoch + 1);
4. observe load, plan (balancer), place orphans at once, start warm hand-overs for moves
   (auto-rebalance when imbalance > threshold, at most once per cooldown, never while a
   hand-over is still running);
5. spread hot tenants (routing table + compacted topic);
6. NOTIFY the workers when leases changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from schema.topics import partition_for
from workers.config import Settings
from workers.manager import balancer, leases, pg
from workers.manager.demand import DemandMeter
from workers.manager.errors import NotLeader
from workers.manager.leader import Leadership
from workers.manager.routing import RoutePublisher, plan_routes, read_routes, recent_routes
from workers.manager.state import Observed, balancer_inputs, observe, pet_types_of, tenant_costs

log = logging.getLogger("flock.manager")


def balancer_config(s: Settings, force: bool = False) -> balancer.BalancerConfig:
    return balancer.BalancerConfig(threshold=s.rebalance_threshold, target=s.rebalance_target,
                                   min_dwell_s=0.0 if force else s.rebalance_min_dwell_s,
                                   max_moves=s.rebalance_max_moves)


async def plan_now(conn, s: Settings, force: bool = False,
                   arrivals: dict[int, float] | None = None) -> tuple[balancer.Plan, Observed, list]:
    obs = await observe(conn, s.requests_topic)
    workers, parts = balancer_inputs(obs, s.pet_cost_weights, s.worker_timeout_s, arrivals=arrivals)
    return balancer.plan(workers, parts, balancer_config(s, force), force=force), obs, parts


async def apply_plan(conn, s: Settings, plan: balancer.Plan, parts: list[balancer.PartitionLoad]) -> list[balancer.Move]:
    """Placements take effect at once; moves start a warm hand-over. Returns what was started."""
    hot = {p.partition: list(p.hot_tenants) for p in parts}
    done = []
    for m in plan.moves:
        if m.source is None:
            ok = await leases.assign(conn, s.requests_topic, m.partition, m.target, s.lease_timeout_s,
                                     hot.get(m.partition, []))
        else:
            ok = await leases.request_handover(conn, s.requests_topic, m.partition, m.source, m.target,
                                               hot.get(m.partition, []))
        if ok:
            done.append(m)
            await leases.audit(conn, f"lease.{m.reason}", f"{s.requests_topic}/{m.partition}",
                               {"from": m.source, "to": m.target, "cost": round(m.cost, 3),
                                "imbalance_before": round(plan.imbalance_before, 3),
                                "imbalance_after": round(plan.imbalance_after, 3)})
    if done:
        await pg.notify(conn, s.requests_topic)
    return done


@dataclass
class TickReport:
    dead: list[str] = field(default_factory=list)
    expired: list[tuple[int, str]] = field(default_factory=list)
    started: list[balancer.Move] = field(default_factory=list)
    routes_changed: int = 0
    imbalance: float = 1.0


class Manager:
    def __init__(self, s: Settings, manager_id: str | None = None):
        self.s = s
        self.id = manager_id or f"{socket.gethostname()}-{os.getpid()}"
        self.leading = False
        self._next_rebalance = 0.0
        self._grace_until = 0.0
        self.routes = RoutePublisher(s.kafka_bootstrap, s.routing_topic)
        self.demand = DemandMeter(s.kafka_bootstrap, s.requests_topic, s.request_partitions, s.rate_window_s)

    async def run(self, stop: asyncio.Event) -> None:
        lead = Leadership(self.s.database_url, self.s.requests_topic, self.id)
        try:
            while not stop.is_set():
                if not await lead.acquire(self.s.manager_tick_s, stop):
                    break
                self.leading = True
                self._next_rebalance = time.monotonic() + self.s.rebalance_cooldown_s  # let rates settle first
                # Workers may have been cut off from the database (that is often why leadership
                # changed): give them one lease timeout to renew before anything is taken back.
                self._grace_until = time.monotonic() + self.s.lease_timeout_s
                try:
                    while not stop.is_set():
                        await lead.check()
                        try:
                            await self.tick(lead.conn)
                        except Exception:  # noqa: BLE001 - a bad tick (query, Kafka hiccup) must not end leadership;
                            log.exception("manager tick failed")  # a dead connection does, at the next check()
                        try:
                            await asyncio.wait_for(stop.wait(), self.s.manager_tick_s)
                        except TimeoutError:
                            pass
                except (NotLeader, *pg.DB_ERRORS) as exc:
                    log.warning("manager %s lost leadership: %s", self.id, exc)
                    await lead.release()
                finally:
                    self.leading = False
        finally:
            await lead.release()
            await self.routes.close()
            await self.demand.close()

    async def tick(self, conn) -> TickReport:
        s, topic, rep = self.s, self.s.requests_topic, TickReport()
        await leases.ensure_partitions(conn, topic, s.request_partitions)
        if time.monotonic() >= self._grace_until:
            rep.dead = await leases.mark_dead(conn, topic, s.worker_timeout_s)
            rep.expired = await leases.expire(conn, topic)
        cancelled, forced = await leases.settle_handovers(conn, topic, s.handover_timeout_s, s.lease_timeout_s)
        for w in rep.dead:
            log.warning("worker %s missed heartbeats for %.0fs: marked dead", w, s.worker_timeout_s)
        for p, w in rep.expired:
            log.warning("partition %d taken back from %s (lease lapsed or worker gone)", p, w)
            await leases.audit(conn, "lease.expired", f"{topic}/{p}", {"from": w})
        if cancelled or forced:
            log.warning("hand-overs cancelled %s, forced %s", cancelled, forced)

        arrivals = await self._arrivals()
        plan, obs, parts = await plan_now(conn, s, arrivals=arrivals)
        rep.imbalance = plan.imbalance_before
        handover_running = any(p.moving for p in parts)
        now = time.monotonic()
        if not s.rebalance_auto or handover_running or now < self._next_rebalance:
            # Orphans and drains always; balance moves only when allowed.
            plan.moves = [m for m in plan.moves if m.reason != "balance"]
        rep.started = await apply_plan(conn, s, plan, parts)
        if any(m.reason == "balance" for m in rep.started):
            self._next_rebalance = now + s.rebalance_cooldown_s
            log.info("rebalance: imbalance %.2f -> %.2f predicted, moves %s", plan.imbalance_before,
                     plan.imbalance_after, [(m.partition, m.source, m.target) for m in rep.started])
        if s.spread_hot_tenants:
            rep.routes_changed = await self._spread(conn, obs, parts, arrivals)
        if rep.expired or cancelled or forced:
            await pg.notify(conn, topic)
        return rep

    async def _arrivals(self) -> dict[int, float] | None:
        try:
            await self.demand.sample()
        except Exception as exc:  # noqa: BLE001 - without Kafka, fall back to the workers' own estimates
            log.warning("cannot read end offsets of %s: %s", self.s.requests_topic, exc)
            await self.demand.close()
            return None
        return self.demand.rates() or None

    async def _spread(self, conn, obs: Observed, parts: list[balancer.PartitionLoad],
                      arrivals: dict[int, float] | None) -> int:
        routed = await read_routes(conn)
        # a deleted tenant's route goes; the reports name only heavy hitters, so ask for the rest
        known = set(obs.pet_types) | set(await pet_types_of(conn, set(routed) - set(obs.pet_types)))
        current = {t: p for t, p in routed.items() if t in known}
        costs = tenant_costs(obs, self.s.pet_cost_weights, arrivals)
        n = self.s.request_partitions
        # A route's effect shows in the rates only after a full window: do not judge it sooner.
        frozen = await recent_routes(conn, max(self.s.rebalance_min_dwell_s, 2 * self.s.rate_window_s))
        routes = plan_routes(costs, {p.partition: p.cost for p in parts}, n, lambda t: partition_for(t, n), current,
                             factor=self.s.hot_tenant_factor, frozen=frozen)
        changed = await self.routes.publish(conn, routes, current)
        if changed:
            log.info("tenant routes now %s", routes)
        return changed


def main(s: Settings) -> None:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def go():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Manager(s).run(stop)

    asyncio.run(go())
