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
