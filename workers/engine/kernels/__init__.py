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
        return torch.cuda.is_available()
    except Exception:
        return False
