"""What the load generator saw, and the checker over it.

Recorded: every request produced (and whether Kafka acknowledged it), every reply and DLQ record
read back, with times. The checker states the guarantee: every acknowledged request has at least
one reply or DLQ record. It counts lost (the guarantee broken), duplicates (allowed, bounded),
late (answered after its deadline) and the latency of requests sent while a fault was active.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Sent:
    tenant_id: str
    t_send: float
    timeout_s: float | None  # the request's deadline, relative to t_send
    acked: bool = False


@dataclass
class History:
    sent: dict[str, Sent] = field(default_factory=dict)
    replies: list[tuple[str, str, float]] = field(default_factory=list)  # request_id, status, t
    dlq: list[tuple[str | None, float]] = field(default_factory=list)  # request_id if readable, t
    faults: list[tuple[str, float, float]] = field(default_factory=list)  # name, start, end
    poison_to_dlq: int = 0  # acked poison records that can only be answered by a DLQ record
    t0: float = field(default_factory=time.monotonic)

    def fault(self, name: str, start: float, end: float) -> None:
        self.faults.append((name, start, end))

    def check(self, window_s: float = 30.0) -> dict:
        acked = {rid for rid, s in self.sent.items() if s.acked}
        counts = Counter(rid for rid, _, _ in self.replies)
        dlq_ids = {rid for rid, _ in self.dlq if rid}
        answered = set(counts) | dlq_ids
        lost = sorted(acked - answered)
        first_reply: dict[str, tuple[str, float]] = {}
        for rid, status, t in self.replies:
            first_reply.setdefault(rid, (status, t))
        late = sum(1 for rid, (status, t) in first_reply.items()
                   if rid in self.sent and status == "ok" and self.sent[rid].timeout_s is not None
                   and t - self.sent[rid].t_send > self.sent[rid].timeout_s)
        statuses = Counter(status for rid, (status, _t) in first_reply.items() if rid in self.sent)
        lat = sorted((first_reply[rid][1] - self.sent[rid].t_send) * 1000 for rid in acked if rid in first_reply)
        during = []
        for _, start, end in self.faults:
            during += [(first_reply[rid][1] - s.t_send) * 1000 for rid, s in self.sent.items()
                       if rid in first_reply and start <= s.t_send <= end + window_s]
        during.sort()
        pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None  # noqa: E731
        dlq_missing = max(0, self.poison_to_dlq - sum(1 for rid, _ in self.dlq if not rid))
        return {"sent": len(self.sent), "acked": len(acked), "replied": len(set(counts) & set(self.sent)),
                "dlq": len(self.dlq), "lost": len(lost) + dlq_missing, "lost_ids": lost[:20],
                "duplicates": sum(c - 1 for c in counts.values()), "late": late,
                "statuses": dict(statuses), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                "p99_during_fault_ms": pct(during, 0.99), "recovery_s": self.recovery_s()}

    def recovery_s(self) -> float | None:
        """Longest silence in replies after the first fault began: how long service stopped."""
        if not self.faults:
            return None
        start = min(f[1] for f in self.faults)
        times = sorted(t for _, _, t in self.replies if t >= start)
        if not times:
            return None
        gaps = [times[0] - start] + [b - a for a, b in zip(times, times[1:])]
        return round(max(gaps), 2)

    def timeline(self, bucket_s: float = 1.0) -> dict[str, list[float]]:
        """Per-bucket counts of sends and replies (for the plots)."""
        end = max([s.t_send for s in self.sent.values()] + [t for _, _, t in self.replies] + [self.t0])
        n = int((end - self.t0) / bucket_s) + 1
        sends, replies = [0] * n, [0] * n
        for s in self.sent.values():
            sends[int((s.t_send - self.t0) / bucket_s)] += 1
        for _, _, t in self.replies:
            if t >= self.t0:
                replies[int((t - self.t0) / bucket_s)] += 1
        return {"t": [i * bucket_s for i in range(n)], "sent": sends, "replied": replies}
