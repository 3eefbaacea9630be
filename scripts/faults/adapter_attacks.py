"""Malicious or corrupt adapter uploads through the real CLI: each must be refused with a
one-line reason and a non-zero exit, and nothing may be written (rows, blobs, files)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy import create_engine, func, select

from schema.tables import Adapter, AdapterBlob
from schema.layout import expected_tensors
from workers.config import sync_database_url
from workers.models import base_dims

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CONFIG = {"r": 2, "alpha": 4, "sites": ["q"], "task": "seq_cls", "labels": ["a", "b"]}


class _Exec:
    def __reduce__(self):
        return (os.system, ("touch /tmp/flock-adapter-pwned",))


def _good_tensors() -> dict[str, torch.Tensor]:
    return {s.name: torch.randn(s.shape) * 0.02 for s in expected_tensors("lora", CONFIG, base_dims(MINILM))}


def _native(d: Path, tensors=None, manifest_extra=None, raw: bytes | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "flock_adapter.json").write_text(json.dumps({"pet_type": "lora", "config": CONFIG, **(manifest_extra or {})}))
    if raw is not None:
        (d / "adapter.safetensors").write_bytes(raw)
    else:
        save_file(tensors or _good_tensors(), str(d / "adapter.safetensors"))
    return d


def attacks(root: Path) -> dict[str, Path]:
    t = _good_tensors()
    nan, inf, shape = dict(t), dict(t), dict(t)
    nan["layers.0.q.lora_A"] = nan["layers.0.q.lora_A"].clone().index_fill_(1, torch.tensor([3]), float("nan"))
    inf["head.weight"] = inf["head.weight"].clone().fill_(float("inf"))
    shape["layers.1.q.lora_B"] = torch.zeros(768, 2)
    good = _native(root / "good-ref")
    data = (good / "adapter.safetensors").read_bytes()
    peft_pickle = root / "peft-bin"
    peft_pickle.mkdir(parents=True)
    (peft_pickle / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2}))
    (peft_pickle / "adapter_model.bin").write_bytes(pickle.dumps(_Exec()))
    return {
        "pickle payload as .safetensors": _native(root / "pickle", raw=pickle.dumps({"w": _Exec()})),
        "torch.save zip as .safetensors": _native(root / "torchzip", raw=_torch_zip()),
        "PEFT adapter_model.bin (pickle)": peft_pickle,
        "NaN values": _native(root / "nan", nan),
        "Inf values": _native(root / "inf", inf),
        "wrong shapes (BERT-base into MiniLM)": _native(root / "shape", shape),
        "lying checksum in manifest": _native(root / "sha", t, {"sha256": "0" * 64}),
        "truncated file": _native(root / "trunc", raw=data[: len(data) // 3]),
        "absurd header length": _native(root / "hdr", raw=(2**62).to_bytes(8, "little") + b"{}"),
        "oversize (limit 16 KiB)": _native(root / "big", t),
        "unsupported PET type": _write_manifest(_native(root / "pet", t), pet_type="prompt"),
    }


def _write_manifest(d: Path, **over) -> Path:
    m = json.loads((d / "flock_adapter.json").read_text())
    m.update(over)
    (d / "flock_adapter.json").write_text(json.dumps(m))
    return d


def _torch_zip() -> bytes:
    with tempfile.NamedTemporaryFile() as f:
        torch.save({"x": torch.zeros(2)}, f.name)
        return Path(f.name).read_bytes()


def _counts(url: str) -> tuple[int, int]:
    e = create_engine(sync_database_url(url))
    try:
        with e.connect() as c:
            return (c.scalar(select(func.count()).select_from(Adapter)),
                    c.scalar(select(func.count()).select_from(AdapterBlob)))
    finally:
        e.dispose()


def run(database_url: str, tenant: str, work: Path) -> dict:
    """Try every attack; return the scenario row and per-attack outcomes."""
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url, "FLOCK_STORE_DIR": str(work / "blobs")}
    subprocess.run([sys.executable, "-m", "workers.cli", "tenant", "create", tenant], env=env,
                   capture_output=True, stdin=subprocess.DEVNULL)
    before = _counts(database_url)
    outcomes = {}
    for name, d in attacks(work / "attacks").items():
        e = dict(env, FLOCK_MAX_ADAPTER_BYTES="16384") if name.startswith("oversize") else env
        p = subprocess.run([sys.executable, "-m", "workers.cli", "adapter", "import", tenant, str(d)], env=e,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        outcomes[name] = {"exit": p.returncode, "reason": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""}
    after = _counts(database_url)
    blobs_on_disk = sum(1 for f in (work / "blobs").rglob("*") if f.is_file()) if (work / "blobs").exists() else 0
    rejected = sum(1 for o in outcomes.values() if o["exit"] == 1 and o["reason"].startswith("error: "))
    return {"attempts": len(outcomes), "rejected": rejected, "rows_written": after[0] - before[0],
            "blobs_written": after[1] - before[1] + blobs_on_disk,
            "code_executed": os.path.exists("/tmp/flock-adapter-pwned"), "outcomes": outcomes}
