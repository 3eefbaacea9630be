"""Adapter store on real PostgreSQL: PEFT import, both backends, rejections that write nothing."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select, text

from schema.tables import Adapter, AdapterBlob
from tests.adapter_factory import MINILM, make_peft_lora, random_delta, write_native
from workers.adapters.importers import read_adapter_dir
from workers.adapters.store import AdapterCorrupt, AdapterStore, TenantNotFound, make_backend
from workers.adapters.validate import AdapterRejected
from workers.models import base_dims
from workers.tenants import TenantRegistry


@pytest.fixture(params=["postgres", "filesystem"])
def store(request, sessions, tmp_path):
    return AdapterStore(sessions, make_backend(request.param, tmp_path / "blobs"), max_bytes=8 << 20)


@pytest.fixture()
def tenant(sessions, unique):
    return TenantRegistry(sessions).create(f"t-{unique}").tenant_id


@pytest.fixture(scope="module")
def peft_dir(minilm_dir, tmp_path_factory):
    return make_peft_lora(minilm_dir, tmp_path_factory.mktemp("peft") / "lora", r=4, labels=3)


def _counts(sessions):
    with sessions() as s:
        return (s.scalar(select(func.count()).select_from(Adapter)),
                s.scalar(select(func.count()).select_from(AdapterBlob)))


def test_peft_lora_import_round_trip(store, tenant, peft_dir):
    imp = read_adapter_dir(peft_dir, labels=["neg", "neu", "pos"])
    assert imp.pet_type == "lora" and imp.config["r"] == 4 and imp.config["alpha"] == 8
    assert imp.config["sites"] == ["q", "v"] and imp.config["layers"] == list(range(6))
    rec = store.import_tensors(tenant, imp.pet_type, imp.config, imp.tensors, MINILM)
    assert rec.version == 1 and len(rec.sha256) == 64
    loaded = store.load(tenant)
    raw = load_file(str(peft_dir / "adapter_model.safetensors"))
    # Independent check against PEFT's own file: every LoRA matrix and the head arrive unchanged.
    a = raw["base_model.model.bert.encoder.layer.3.attention.self.value.lora_A.weight"]
    b = raw["base_model.model.bert.encoder.layer.3.attention.self.value.lora_B.weight"]
    assert torch.equal(loaded.tensors["layers.3.v.lora_A"], a)
    assert torch.equal(loaded.tensors["layers.3.v.lora_B"], b)
    assert torch.equal(loaded.tensors["head.weight"], raw["base_model.model.classifier.weight"])
    assert loaded.record.config["labels"] == ["neg", "neu", "pos"]
    rec2 = store.import_tensors(tenant, imp.pet_type, imp.config, imp.tensors, MINILM)
    assert rec2.version == 2 and rec2.sha256 == rec.sha256  # content-addressed: same bytes, one blob


@pytest.mark.parametrize("pet_type, config", [
    ("adapter", {"variant": "houlsby", "bottleneck": 16, "task": "seq_cls", "labels": ["a", "b"]}),
    ("adapter", {"variant": "pfeiffer", "bottleneck": 8, "task": "token_cls", "labels": ["O", "B", "I"]}),
    ("bitfit", {"task": "seq_cls", "labels": ["x", "y", "z", "w"]}),
    ("ia3", {"task": "seq_cls", "labels": ["a", "b"]}),
    ("diff", {"task": "seq_cls", "labels": ["a", "b"], "sites": ["q", "ffn_out"]}),
    ("maskbert", {"task": "seq_cls", "labels": ["a", "b"], "sites": ["v"]}),
])
def test_native_import_every_pet_type(store, tenant, tmp_path, pet_type, config):
    tensors = random_delta(pet_type, config, base_dims(MINILM))
    imp = read_adapter_dir(write_native(tmp_path / "a", pet_type, config, tensors))
    store.import_tensors(tenant, imp.pet_type, imp.config, imp.tensors, MINILM)
    loaded = store.load(tenant)
    assert loaded.record.pet_type == pet_type
    assert set(loaded.tensors) == set(tensors)
    assert all(torch.equal(loaded.tensors[k], tensors[k]) for k in tensors)


def _native_lora(tmp_path, tensors_override=None, drop=None, config_override=None):
    good = {"r": 2, "alpha": 4, "sites": ["q"], "task": "seq_cls", "labels": ["a", "b"]}
    tensors = random_delta("lora", good, base_dims(MINILM))
    config = {**good, **(config_override or {})}
    tensors.update(tensors_override or {})
    for k in drop or ():
        tensors.pop(k)
    return write_native(tmp_path / "bad", "lora", config, tensors)


def _rejects(store, sessions, tenant, directory, match):
    before = _counts(sessions)
    with pytest.raises(AdapterRejected, match=match):
        imp = read_adapter_dir(directory)
        store.import_tensors(tenant, imp.pet_type, imp.config, imp.tensors, MINILM)
    assert _counts(sessions) == before, "a rejected import wrote something"
    if hasattr(store.backend, "root") and store.backend.root.exists():
        assert not any(p.is_file() for p in store.backend.root.rglob("*"))


def test_rejects_nan(store, sessions, tenant, tmp_path):
    t = torch.zeros(2, 384)
    t[1, 7] = float("nan")
    _rejects(store, sessions, tenant, _native_lora(tmp_path, {"layers.0.q.lora_A": t}), "NaN or Inf")


def test_rejects_inf_in_head(store, sessions, tenant, tmp_path):
    _rejects(store, sessions, tenant, _native_lora(tmp_path, {"head.bias": torch.tensor([0.0, float("inf")])}),
             "NaN or Inf")


def test_rejects_wrong_shape(store, sessions, tenant, tmp_path):
    _rejects(store, sessions, tenant, _native_lora(tmp_path, {"layers.2.q.lora_A": torch.zeros(2, 768)}),
             "does not match the base model")


def test_rejects_missing_and_unexpected(store, sessions, tenant, tmp_path):
    _rejects(store, sessions, tenant, _native_lora(tmp_path, drop=["layers.5.q.lora_B"]), "missing tensors")
    _rejects(store, sessions, tenant, _native_lora(tmp_path, {"layers.0.k.lora_A": torch.zeros(2, 384)}),
             "unexpected tensors")


def test_rejects_bad_config(store, sessions, tenant, tmp_path):
    _rejects(store, sessions, tenant, _native_lora(tmp_path, config_override={"r": 0}), "config.r")


def test_rejects_corrupt_safetensors(store, sessions, tenant, tmp_path):
    d = _native_lora(tmp_path)
    data = (d / "adapter.safetensors").read_bytes()
    (d / "adapter.safetensors").write_bytes(data[:len(data) // 2])  # truncated
    _rejects(store, sessions, tenant, d, "corrupt safetensors|not a safetensors")
    (d / "adapter.safetensors").write_bytes(b"\xff" * 64)  # absurd header length
    _rejects(store, sessions, tenant, d, "not a safetensors")


class Boom:
    def __reduce__(self):  # would run a command if anything unpickled it
        return (exec, ("open('/tmp/flock-pwned','w').write('x')",))


def test_rejects_pickle_payloads(store, sessions, tenant, tmp_path, peft_dir):
    d = _native_lora(tmp_path)
    (d / "adapter.safetensors").write_bytes(pickle.dumps({"layers.0.q.lora_A": Boom()}))
    _rejects(store, sessions, tenant, d, "pickle")
    torch.save({"x": torch.zeros(2)}, d / "adapter.safetensors")  # torch zip format
    _rejects(store, sessions, tenant, d, "pickle")
    # A PEFT directory with only the pickled adapter_model.bin is refused, never loaded.
    p = tmp_path / "peft_bin"
    p.mkdir()
    (p / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (p / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    _rejects(store, sessions, tenant, p, "pickle")
    import os
    assert not os.path.exists("/tmp/flock-pwned")


def test_rejects_oversize(sessions, tenant, tmp_path):
    small = AdapterStore(sessions, make_backend("postgres", tmp_path), max_bytes=10_000)
    _rejects(small, sessions, tenant, _native_lora(tmp_path), "exceeds the limit")


def test_unknown_tenant_writes_nothing(store, sessions, tmp_path):
    imp = read_adapter_dir(_native_lora(tmp_path))
    before = _counts(sessions)
    with pytest.raises(TenantNotFound):
        store.import_tensors("no-such-tenant", imp.pet_type, imp.config, imp.tensors, MINILM)
    assert _counts(sessions) == before


def test_tampered_blob_is_refused_at_load(sessions, tenant, tmp_path):
    store = AdapterStore(sessions, make_backend("postgres", tmp_path))
    imp = read_adapter_dir(_native_lora(tmp_path))
    rec = store.import_tensors(tenant, imp.pet_type, imp.config, imp.tensors, MINILM)
    with sessions.begin() as s:  # flip the stored bytes; the row keeps the old checksum
        s.execute(text("UPDATE adapter_blobs SET data = overlay(data placing '\\x00'::bytea from 200) "
                       "WHERE sha256 = :sha"), {"sha": rec.sha256})
    with pytest.raises(AdapterCorrupt, match="sha256"):
        store.load(tenant)
