"""Every PET type in a mixed batch of >= 50 tenants equals, row by row, an independent
single-tenant reference (plain transformers model with merged weights / hooks), fp32, rel err <= 1e-4."""

import numpy as np
import pytest

from schema.layout import PET_TYPES
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine

from .conftest import Reference, check_outputs, dims_of, random_batch, random_delta


@pytest.fixture(scope="module")
def ref(tiny_bert_dir):
    return Reference(tiny_bert_dir)


def _engine(model_dir, deltas, **pool):
    return Engine(model_dir, lambda tid: deltas[tid], device="cpu", pool_config=PoolConfig(**pool))


@pytest.mark.parametrize("pet", PET_TYPES)
def test_mixed_batch_single_pet_type(pet, tiny_bert_dir, ref):
    rng = np.random.default_rng(PET_TYPES.index(pet))
    dims = dims_of(tiny_bert_dir)
    deltas = {f"{pet}-{i}": random_delta(f"{pet}-{i}", pet, dims, rng) for i in range(52)}
    batch = random_batch(list(deltas), rng, vocab=120)
    eng = _engine(tiny_bert_dir, deltas)
    try:
        outs = eng.run(batch, timeout=120)
    finally:
        eng.close()
    assert len({d.config["labels"].__len__() for d in deltas.values()}) > 1
    check_outputs(outs, batch, deltas, ref)


def test_all_pet_types_in_one_batch(tiny_bert_dir, ref):
    rng = np.random.default_rng(42)
    dims = dims_of(tiny_bert_dir)
    deltas = {}
    for i in range(60):
        pet = PET_TYPES[i % len(PET_TYPES)]
        deltas[f"t{i}"] = random_delta(f"t{i}", pet, dims, rng)
    batch = random_batch(list(deltas), rng, vocab=120, seqs_per_tenant=(1, 2))
    eng = _engine(tiny_bert_dir, deltas)
    try:
        outs = eng.run(batch, timeout=120)
    finally:
        eng.close()
    check_outputs(outs, batch, deltas, ref)
