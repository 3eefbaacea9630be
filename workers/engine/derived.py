"""Derived bases: a new base directory built from a base model (a skipping base, an FP8 base).

A derived base is a base like any other (its own id, a directory under FLOCK_MODELS_DIR): the
base's files hard-linked (no copy of the checkpoint), ``config.json`` with one extra key naming
what was derived and how, plus the derived part's own safetensors files. Both builders read their
unlabelled corpus the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence


def read_corpus(files: Sequence[str]) -> list[str]:
    """Texts of plain-text files (one per non-empty line) or JSONL files (their ``text`` field)."""
    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"{f}: no such corpus file")
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            if p.suffix == ".jsonl":
                line = str(json.loads(line).get("text", "")).strip()
            if line:
                texts.append(line)
    if not texts:
        raise ValueError("the corpus has no text")
    return texts


def write_derived_base(base_dir: str, out: Path, key: str, meta: dict) -> None:
    """``out`` gets the base's files (linked where the file system allows) and its config.json
    with ``key: meta`` added; the caller writes the derived part's files beside them."""
    out.mkdir(parents=True, exist_ok=True)
    src = Path(base_dir)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not (out / f.name).exists():
            try:
                os.link(f, out / f.name)  # same file system: no copy of the checkpoint
            except OSError:
                shutil.copy2(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = meta
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
