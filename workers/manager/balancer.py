"""The balancer: a pure function from observed load to a plan of partition moves.

Load of a partition = measured tokens/s weighted by PET type (see :mod:`workers.manager.state`).
A worker's relative load = its partitions' load / its capacity; imbalance = the largest relative
load over the mean (total load / total capacity), so 1.0 is perfect.

Rules, in order:
1. Partitions nobody (alive) holds are placed first, largest first, where they raise the
   relative load least; ties go to the worker already holding the partition's hot tenants.
2. Partitions of workers that no longer accept work (draining) must move, whatever it costs.
3. Balance moves only when imbalance > ``threshold`` (or forced), then greedily the single move
   that lowers the maximum relative load most, until imbalance <= ``target`` (hysteresis), no
   move gains at least ``min_gain``, or ``max_moves`` are planned. A partition that moved less
   than ``min_dwell_s`` ago stays put. Near-ties prefer the target holding more of the
   partition's hot tenants (warm adapters), then the cheaper move.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    capacity: float = 1.0
    accepting: bool = True  # False: draining; it keeps nothing
    resident: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PartitionLoad:
    partition: int
    owner: str | None
    cost: float  # weighted tokens/s
    hot_tenants: tuple[str, ...] = ()
    dwell_s: float = float("inf")  # since the current owner got it
    moving: bool = False  # a hand-over is already under way


@dataclass(frozen=True)
class BalancerConfig:
    threshold: float = 1.25
    target: float = 1.10
    min_dwell_s: float = 30.0
    max_moves: int = 4
    min_gain: float = 0.01  # imbalance points a move must win
    near_tie: float = 0.02  # moves within this of the best gain count as equal (affinity decides)


@dataclass(frozen=True)
class Move:
    partition: int
    source: str | None  # None: an unowned partition being placed
    target: str
    cost: float
    reason: str  # place | drain | balance


@dataclass
class Plan:
    moves: list[Move] = field(default_factory=list)
    imbalance_before: float = 1.0
    imbalance_after: float = 1.0
    load_before: dict[str, float] = field(default_factory=dict)
    load_after: dict[str, float] = field(default_factory=dict)

    @property
    def placements(self) -> list[Move]:
        return [m for m in self.moves if m.source is None]

    @property
    def handovers(self) -> list[Move]:
        return [m for m in self.moves if m.source is not None]


def imbalance(load: dict[str, float], capacity: dict[str, float]) -> float:
    total_cap = sum(capacity[w] for w in load)
    total = sum(load.values())
    mean = total / total_cap if load and total_cap > 0 else 0.0
    if mean <= 0:  # no load (or so little it underflows to zero): nothing to balance
        return 1.0
    return max(load[w] / capacity[w] for w in load) / mean


def _affinity(w: WorkerLoad, p: PartitionLoad) -> float:
    return sum(t in w.resident for t in p.hot_tenants) / len(p.hot_tenants) if p.hot_tenants else 0.0


def plan(workers: list[WorkerLoad], partitions: list[PartitionLoad], cfg: BalancerConfig = BalancerConfig(),
         force: bool = False) -> Plan:
    """Moves that balance load. Pure: same input, same plan."""
    accepting = {w.worker_id: w for w in workers if w.accepting and w.capacity > 0}
    if not accepting:
        return Plan()
    cap = {w: accepting[w].capacity for w in accepting}
    # A partition with no measured load still occupies a worker: count it as a sliver, so that
    # with no data at all the plan spreads partitions evenly by number.
    known = [p.cost for p in partitions if p.cost > 0]
    floor = 0.01 * (sum(known) / len(known)) if known else 1.0
    eff = {p.partition: max(p.cost, 0.0) + floor for p in partitions}

    load = {w: 0.0 for w in accepting}
    owner: dict[int, str | None] = {}
    for p in partitions:
        if p.owner in accepting:
            load[p.owner] += eff[p.partition]
            owner[p.partition] = p.owner
        else:
            owner[p.partition] = None
    before = dict(load)
    result = Plan(load_before=before)
    byid = {p.partition: p for p in partitions}

    def best_target(p: PartitionLoad, exclude: str | None) -> str:
        def key(w: str):
            rel = (load[w] + eff[p.partition]) / cap[w]
            return (round(rel, 9), -_affinity(accepting[w], p), w)
        return min((w for w in accepting if w != exclude), key=key)

    # 1 + 2: orphans and partitions of draining/dead workers, largest first.
    homeless = sorted((p for p in partitions if owner[p.partition] is None and not p.moving),
                      key=lambda p: -eff[p.partition])
    for p in homeless:
        w = best_target(p, None)
        load[w] += eff[p.partition]
        owner[p.partition] = w
        draining = p.owner is not None and p.owner not in accepting and any(
            x.worker_id == p.owner for x in workers)
        result.moves.append(Move(p.partition, p.owner if draining else None, w, p.cost,
                                 "drain" if draining else "place"))
    result.imbalance_before = imbalance(before, cap) if sum(before.values()) > 0 else imbalance(load, cap)

    # 3: balance.
    current = imbalance(load, cap)
    if force or current > cfg.threshold:
        moved = {m.partition for m in result.moves}
        mean = sum(load.values()) / sum(cap.values())  # a move changes neither total
        while mean > 0 and len([m for m in result.moves if m.reason == "balance"]) < cfg.max_moves and current > cfg.target:
            candidates = []
            # A move changes two workers' loads: the new maximum is theirs or the largest of the
            # rest, which is among the three largest now. O(partitions x workers) per move.
            top3 = sorted(accepting, key=lambda w: -load[w] / cap[w])[:3]
            for p in partitions:
                src = owner[p.partition]
                if src is None or p.moving or p.partition in moved or p.dwell_s < cfg.min_dwell_s:
                    continue
                e = eff[p.partition]
                from_src = (load[src] - e) / cap[src]
                others = [(load[w] / cap[w], w) for w in top3 if w != src] + [(0.0, None)] * 2
                for dst in accepting:
                    if dst == src:
                        continue
                    rest = others[0][0] if others[0][1] != dst else others[1][0]
                    gain = current - max(rest, from_src, (load[dst] + e) / cap[dst]) / mean
                    if gain >= cfg.min_gain:
                        # rounded: equal gains stay equal whatever the float order (ties break below)
                        candidates.append((round(gain, 9), p, dst, src))
            if not candidates:
                break
            top = max(c[0] for c in candidates)
            near = [c for c in candidates if c[0] >= top - cfg.near_tie]  # affinity only for these
            _, best, dst, src = max(near, key=lambda c: (_affinity(accepting[c[2]], c[1]), -c[1].cost, c[0],
                                                         -c[1].partition, c[2]))
            part = best.partition
            load[src] -= eff[part]
            load[dst] += eff[part]
            owner[part] = dst
            moved.add(part)
            result.moves.append(Move(part, src, dst, byid[part].cost, "balance"))
            current = imbalance(load, cap)
    result.load_after = load
    result.imbalance_after = current
    return result
