"""Bulk registration and tenant paging on real PostgreSQL (issue #15)."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import func, select

from schema.tables import Adapter, Tenant
from tests.adapter_factory import MINILM, random_delta, write_native
from workers.adapters.bulk import ManifestError, import_many, read_source
from workers.adapters.store import AdapterStore, make_backend
from workers.models import base_dims
from workers.tenants import TenantRegistry

LORA = {"r": 2, "alpha": 4, "sites": ["q"], "layers": [5], "task": "seq_cls", "labels": ["a", "b"],
        "pooling": "mean"}


@pytest.fixture()
def store(sessions, tmp_path):
    return AdapterStore(sessions, make_backend("postgres", tmp_path / "blobs"), max_bytes=8 << 20)


def _tenant_dirs(root, prefix: str, n: int, seed: int = 0):
    dims = base_dims(MINILM)
    for i in range(n):
        write_native(root / f"{prefix}-{i:03d}", "lora", LORA, random_delta("lora", LORA, dims, seed=seed + i))
    return root


def test_directory_import_is_validated_batched_and_resumable(store, sessions, tmp_path, unique):
    root = _tenant_dirs(tmp_path / "src", f"b{unique}", 23)
    bad = write_native(root / f"b{unique}-bad", "lora", LORA, {"head.weight": torch.zeros(2, 384)})
    (root / "Not_A_Tenant").mkdir()
    seen = []
    report = import_many(store, read_source(root), default_base_model=MINILM, batch_size=5, progress=seen.append)
    assert report.imported == 23 and report.unchanged == 0 and sum(seen) == 25
    refused = dict(report.refused)
    assert set(refused) == {bad.name, "Not_A_Tenant"}
    assert "missing" in refused[bad.name] or "tensor" in refused[bad.name]
    assert "must match" in refused["Not_A_Tenant"]
    with sessions() as s:
        rows = s.execute(select(Tenant.tenant_id, Tenant.active_version).where(
            Tenant.tenant_id.startswith(f"b{unique}-"))).all()
        assert sorted(v for _, v in rows) == [1] * 23  # the refused tenant was never created
    # What was stored is what was on disk, byte for byte after the store's own validation.
    loaded = store.load(f"b{unique}-007")
    assert torch.equal(loaded.tensors["layers.5.q.lora_A"], random_delta("lora", LORA, base_dims(MINILM), seed=7)["layers.5.q.lora_A"])

    # Resumable: the same source again adds no versions; a changed adapter gets version 2.
    write_native(root / f"b{unique}-003", "lora", LORA, random_delta("lora", LORA, base_dims(MINILM), seed=999))
    again = import_many(store, read_source(root), default_base_model=MINILM, batch_size=7)
    assert again.imported == 1 and again.unchanged == 22
    assert store.record(f"b{unique}-003").version == 2 and store.record(f"b{unique}-004").version == 1


def test_manifest_with_names_and_bad_lines(store, tmp_path, unique):
    src = _tenant_dirs(tmp_path / "a", f"m{unique}", 3)
    manifest = tmp_path / "tenants.jsonl"
    manifest.write_text("\n".join(json.dumps({"tenant_id": d.name, "path": f"a/{d.name}", "display_name": d.name.upper()})
                                  for d in sorted(src.iterdir())) + "\n")
    report = import_many(store, read_source(manifest), default_base_model=MINILM)
    assert report.imported == 3
    assert TenantRegistry(store.sessions).show(f"m{unique}-001").display_name == f"M{unique}-001".upper()
    manifest.write_text('{"tenant_id": "x"}\n')
    with pytest.raises(ManifestError, match=":1:"):
        read_source(manifest)


def test_paging_is_stable_and_filters(store, sessions, tmp_path, unique):
    reg = TenantRegistry(sessions)
    import_many(store, read_source(_tenant_dirs(tmp_path / "p", f"p{unique}", 12)), default_base_model=MINILM)
    reg.create(f"p{unique}-zz-empty")
    seen, after = [], None
    while True:
        page = reg.page(limit=5, after=after, prefix=f"p{unique}-")
        seen += [t.tenant_id for t in page.tenants]
        if page.next_after is None:
            break
        if after is None:  # created behind the cursor while paging: no repeats, nothing skipped ahead
            reg.create(f"p{unique}-000a")
        after = page.next_after
    assert seen == sorted(set(seen)) and len(seen) == 13 and seen[-1] == f"p{unique}-zz-empty"
    assert all(t.pet_type == "lora" and t.adapters == 1 for t in reg.page(limit=50, prefix=f"p{unique}-0", pet_type="lora").tenants
               if t.tenant_id != f"p{unique}-000a")
    assert [t.tenant_id for t in reg.page(limit=50, prefix=f"p{unique}-zz").tenants] == [f"p{unique}-zz-empty"]
    assert reg.page(limit=50, prefix=f"p{unique}-", pet_type="ia3").tenants == []
    with sessions() as s:
        n = s.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id.startswith(f"p{unique}-")))
    assert n == 12


def test_cli_import_many_and_paged_list(database_url, tmp_path, unique):
    import os
    import subprocess
    import sys
    root = _tenant_dirs(tmp_path / "c", f"c{unique}", 4)
    (root / "Bad_Id").mkdir()
    env = {**os.environ, "FLOCK_DATABASE_URL": database_url}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300, stdin=subprocess.DEVNULL)
    p = cli("tenant", "import-many", str(root), "--json", "--refusals", str(tmp_path / "refused.jsonl"))
    assert p.returncode == 1, p.stderr  # a refusal is a non-zero exit, the others are imported
    body = json.loads(p.stdout)
    assert (body["imported"], body["refused"]) == (4, 1) and body["refusals"][0]["tenant_id"] == "Bad_Id"
    assert json.loads((tmp_path / "refused.jsonl").read_text())["tenant_id"] == "Bad_Id"
    p = cli("tenant", "list", "--prefix", f"c{unique}", "--limit", "3", "--json")
    first = json.loads(p.stdout)
    assert [t["tenant_id"] for t in first["tenants"]] == [f"c{unique}-{i:03d}" for i in range(3)]
    rest = json.loads(cli("tenant", "list", "--prefix", f"c{unique}", "--after", first["next_after"], "--json").stdout)
    assert [t["tenant_id"] for t in rest["tenants"]] == [f"c{unique}-003"] and rest["next_after"] is None
    p = cli("tenant", "import-many", str(tmp_path / "missing"))
    assert p.returncode == 1 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
