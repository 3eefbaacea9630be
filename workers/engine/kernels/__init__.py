"""Custom CUDA kernels (Triton). Every kernel has a torch path used on CPU and as reference."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    if os.environ.get("FLOCK_DISABLE_TRITON") == "1":
        return False
    try:
        import torch
        import triton  # noqa: F401
        return torch.cuda.is_available() or interpret()
    except Exception:
        return False


def interpret() -> bool:
    """TRITON_INTERPRET=1: run the Triton fast path on CPU tensors (numpy interpreter; tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def time_us(fn, reps: int = 10) -> float:
    """Microseconds per call of ``fn`` on the current CUDA stream (one warm-up call first)."""
    import torch
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps
