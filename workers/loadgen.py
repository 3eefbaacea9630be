"""`flockserve load`: an open-loop load generator over the client SDK.

Requests go out at a fixed rate whatever the replies do (open loop, so queueing shows up in the
latencies instead of slowing the generator), tenants drawn uniformly or Zipf-skewed, text lengths
drawn from a range. Reports throughput, latency percentiles and reply status counts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from workers.client import FlockClient

WORDS = ("the market rallied after strong earnings while the central bank held rates steady and "
         "analysts expect growth to slow next quarter team won the final match with a late goal "
         "new phone launches with a faster chip and a brighter screen film festival opens tonight "
         "government announces budget cuts to public services amid protests").split()


@dataclass
class LoadReport:
    sent: int = 0
    replied: int = 0
    timeouts: int = 0
    duration_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

    def summary(self) -> dict:
        return {"sent": self.sent, "replied": self.replied, "timeouts": self.timeouts,
                "duration_s": round(self.duration_s, 3),
                "throughput_rps": round(self.replied / self.duration_s, 1) if self.duration_s else 0.0,
                "p50_ms": round(self.percentile(50), 1), "p95_ms": round(self.percentile(95), 1),
                "p99_ms": round(self.percentile(99), 1), "statuses": dict(self.statuses),
                "duplicates": self.duplicates}


def tenant_sampler(tenants: list[str], dist: str, zipf_s: float, rng: random.Random) -> Callable[[], str]:
    if dist == "uniform":
        return lambda: rng.choice(tenants)
    weights = [1.0 / (i + 1) ** zipf_s for i in range(len(tenants))]
    return lambda: rng.choices(tenants, weights)[0]


def make_text(rng: random.Random, min_words: int, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))


async def run_load(client: FlockClient, tenants: list[str], *, rate: float, count: int, dist: str = "uniform",
                   zipf_s: float = 1.1, min_words: int = 4, max_words: int = 60, timeout: float = 60.0,
                   seed: int = 0, progress: Callable[[int, int], None] | None = None) -> LoadReport:
    rng = random.Random(seed)
    pick = tenant_sampler(tenants, dist, zipf_s, rng)
    report = LoadReport()
    waiters: list[asyncio.Task] = []
    start = time.monotonic()

    async def await_reply(fut, t0):
        try:
            reply = await asyncio.wait_for(fut, timeout)
            report.latencies_ms.append((time.monotonic() - t0) * 1000)
            report.replied += 1
            report.statuses[reply.status.value] += 1
        except asyncio.TimeoutError:
            report.timeouts += 1
        if progress:
            progress(report.replied + report.timeouts, count)

    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        req = client.request(pick(), make_text(rng, min_words, max_words), timeout=timeout)
        t0 = time.monotonic()
        fut = await client.submit(req)
        report.sent += 1
        waiters.append(asyncio.create_task(await_reply(fut, t0)))
    await asyncio.gather(*waiters)
    report.duration_s = time.monotonic() - start
    report.duplicates = client.duplicates
    return report
