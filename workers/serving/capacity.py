"""A worker's capacity, measured at start: tokens/s of the engine's own forward pass on synthetic
batches, in thousands (``workers.capacity``; the balancer divides each worker's load by it).

The unit is the same on every device, so a GPU worker next to a CPU worker, or an H200 next to
an older GPU, gets its share of the partitions in proportion to what it can do. The pass is the
shared base model only (no tenant deltas): PET ops add a similar fraction on every device, and
the balancer weighs them separately (FLOCK_PET_COST_WEIGHTS). FLOCK_WORKER_CAPACITY overrides
the measurement (same unit; tests and benchmarks that want equal workers set it on all of them).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("flock.capacity")

# Batch shapes per device kind: big enough to keep the device busy, small enough that the
# measurement costs well under a second of start-up. Sequences of typical request length.
SHAPES = {"cuda": (32, 128), "cpu": (8, 32)}  # (sequences, tokens each)
BUDGET_S = 0.5  # timed passes run until this much time has gone (after warm-up)
WARMUP = 2  # untimed passes first: kernel choices, allocator, caches
MIN_PASSES, MAX_PASSES = 3, 200


def synthetic_batch(vocab: int, seqs: int, length: int, seed: int = 0):
    """``seqs`` sequences of ``length`` random ordinary token ids (no tenants: base only)."""
    import torch

    from workers.engine.batch import PackedBatch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab - 1), vocab, (seqs * length,), generator=g)
    cu = torch.arange(0, (seqs + 1) * length, length)
    return PackedBatch(ids, cu, [f"calibration-{i}" for i in range(seqs)])


def measure_capacity(engine, budget_s: float = BUDGET_S) -> float:
    """Thousands of tokens/s of ``engine`` (timed ``encode_base`` passes, which end in a copy to the
    host: the device has finished). Rounded to 3 significant digits."""
    seqs, length = SHAPES.get(engine.device.type, SHAPES["cpu"])
    batch = synthetic_batch(engine.encoder.base.word_emb.shape[0], seqs, length)
    for _ in range(WARMUP):
        engine.encode_base(batch)
    passes, t0 = 0, time.perf_counter()
    while passes < MAX_PASSES and (passes < MIN_PASSES or time.perf_counter() - t0 < budget_s):
        engine.encode_base(batch)
        passes += 1
    elapsed = time.perf_counter() - t0
    ktok_s = passes * seqs * length / elapsed / 1e3
    capacity = float(f"{ktok_s:.3g}")
    log.info("capacity %.3g (thousand tokens/s: %d passes of %dx%d tokens in %.2fs on %s)", capacity, passes,
             seqs, length, elapsed, engine.device)
    return capacity
