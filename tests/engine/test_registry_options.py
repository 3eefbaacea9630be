"""The PET registry (one entry per type), EngineOptions from FLOCK_* settings, and the pool's
public free-bytes view."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from schema.pet import PET_TYPES
from workers.config import Settings
from workers.engine.options import EngineOptions
from workers.engine.pets.registry import HOOKS, PETS, default_cost_weights, with_hook
from workers.engine.sizes import BERT_BASE, bytes_per_tenant

from .conftest import dims_of, random_delta

ROOT = Path(__file__).resolve().parents[2]


def test_registry_is_keyed_by_the_contract_and_every_type_implements_its_hooks():
    assert tuple(PETS) == PET_TYPES
    for name, pet in PETS.items():
        mod = pet.ops  # raises TypeError if a declared hook or the layout functions are missing
        assert mod.__name__ == f"workers.engine.pets.{name}"
        assert set(pet.hooks) <= set(HOOKS)
    assert set(with_hook("linear")) == {"lora", "bitfit", "diff", "maskbert"}
    assert [n for n, p in PETS.items() if not p.banked] == ["diff", "maskbert"]


def test_registry_and_config_load_no_torch():
    code = ("import sys, workers.config, workers.engine.pets.registry; "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_cost_weights_default_from_registry_and_env_override(monkeypatch):
    monkeypatch.delenv("FLOCK_PET_COST_WEIGHTS", raising=False)
    assert Settings().pet_cost_weights == default_cost_weights()
    assert default_cost_weights()["diff"] == 1.25 and default_cost_weights()["lora"] == 1.05
    monkeypatch.setenv("FLOCK_PET_COST_WEIGHTS", '{"diff": 1.4}')
    assert Settings().pet_cost_weights == {"diff": 1.4}


def test_sizes_per_type_from_registry():
    two = {"task": "seq_cls", "labels": ["a", "b"]}
    lora = bytes_per_tenant("lora", {**two, "r": 8, "sites": ["q", "v"]})
    # 12 layers x (A [2*8, 768] + B [2, 768, 8]) bf16 + head (2 x 768 + 2)
    assert lora == 12 * (16 * 768 + 2 * 768 * 8) * 2 + (2 * 768 + 2) * 2
    per_site = 768 * 768 * 4 + 768 * 3072 * 2
    assert bytes_per_tenant("maskbert", two) - bytes_per_tenant("maskbert", {**two, "sites": []}) == per_site * 12 // 8
    # diff: int32 code + bf16 value per nonzero (packed for the batched kernel), + block pointers
    nnz, head = int(per_site * 12 * 0.01), (2 * 768 + 2) * 2
    assert nnz * 6 < bytes_per_tenant("diff", two, BERT_BASE, 2, 0.01) - head < nnz * 6 * 1.01
    with pytest.raises(ValueError):
        bytes_per_tenant("prefix", two)


def test_engine_options_from_the_old_env_names(monkeypatch):
    assert EngineOptions.from_settings(Settings()) == EngineOptions()
    monkeypatch.setenv("FLOCK_LORA_INTO_GEMM", "1")
    monkeypatch.setenv("FLOCK_LORA_FUSED", "0")
    monkeypatch.setenv("FLOCK_VARLEN_ATTN", "flash")
    assert EngineOptions.from_settings(Settings()) == EngineOptions(True, "0", "flash")
    monkeypatch.setenv("FLOCK_VARLEN_ATTN", "fast")
    with pytest.raises(ValueError):
        Settings()
    with pytest.raises(ValueError):
        EngineOptions(lora_fused="yes")


def test_engine_reports_options_and_pool_free_bytes(tiny_bert_dir):
    from workers.engine.pool import PoolConfig
    from workers.engine.runtime import Engine
    from workers.engine.synthetic import random_packed

    dims = dims_of(tiny_bert_dir)
    rng = np.random.default_rng(0)
    deltas = {f"t{i}": random_delta(f"t{i}", p, dims, rng) for i, p in enumerate(("lora", "diff"))}
    eng = Engine(tiny_bert_dir, deltas.__getitem__, device="cpu", pool_config=PoolConfig(default_slots=4),
                 options=EngineOptions(lora_fused="0", varlen_attn="flash"))
    try:
        ch = eng.tuned_choices()
        assert ch["lora_fused"] == "0" and ch["varlen_attn"] == "flash" and ch["fast_path"] is False
        assert ch["tuned_varlen"] is None and ch["tuned_lora_fused"] == {}
        before = eng.pool.free_bytes()
        assert before == eng.pool.config.device_bytes
        eng.run(random_packed(list(deltas), [5, 7], 100))
        after = eng.pool.free_bytes()
        res = list(eng.pool.residents.values())
        taken = {k: sum(r.bank is b for r in res) + sum(r.head_bank is b for r in res)
                 for k, b in eng.pool.banks.items()}
        allocated = sum(b.nbytes() for b in eng.pool.banks.values()) + eng.pool.residents["t1"].nbytes
        # free = budget no bank holds yet + the free slots (4 per bank here) of the allocated banks
        assert after == before - allocated + sum((4 - taken[k]) * b.slot_bytes() for k, b in eng.pool.banks.items())
        assert any(k.startswith("lora") for k in taken) and 0 < after < before
    finally:
        eng.close()
