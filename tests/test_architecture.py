"""Layering rules of docs/architecture.md, read from the code itself.

Fresh interpreters check what a module really loads (transitively): the Kafka side of a worker
never loads torch or CUDA libraries, the engine never loads a Kafka client, schema/ stays pure.
The AST checks catch reach-ins: importing another module's ``_private`` names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from import_graph import module_imports, package_edges, package_of  # noqa: E402

GPU_LIBS = ("torch", "cupy", "triton")


def _loaded(module: str, watch: tuple[str, ...]) -> list[str]:
    code = (f"import sys, {module}; "
            f"print(' '.join(m for m in {watch!r} if any(k == m or k.startswith(m + '.') for k in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("module", ["workers.serving.edge", "workers.serving.worker", "workers.serving.sender",
                                    "workers.manager.manager", "workers.client"])
def test_kafka_side_loads_no_gpu_library(module: str) -> None:
    assert _loaded(module, GPU_LIBS + ("workers.engine.kernels",)) == []


@pytest.mark.parametrize("module", ["workers.engine.runtime", "workers.engine.encoder", "workers.engine.pool"])
def test_engine_loads_no_kafka_and_no_serving(module: str) -> None:
    assert _loaded(module, ("aiokafka", "kafka", "workers.serving", "workers.manager", "sqlalchemy")) == []


@pytest.mark.parametrize("module", ["schema.messages", "schema.layout", "schema.tables", "schema.topics"])
def test_schema_is_pure(module: str) -> None:
    assert _loaded(module, GPU_LIBS + ("workers", "aiokafka")) == []


def test_rooms_import_in_one_direction() -> None:
    edges = package_edges()
    assert edges["schema"] == set(), "schema/ is the contract: it imports nothing of workers/"
    engine_rooms = {r for r in edges if r.startswith("workers.engine")}
    for room in engine_rooms:
        outside = {d for d in edges[room] if not d.startswith("workers.engine") and d != "schema"}
        assert outside == set(), f"{room} imports {outside}: the engine knows only schema/ and itself"
    for room in ("workers.manager", "workers.adapters"):
        assert not any(d.startswith("workers.engine") or d == "workers.serving" for d in edges.get(room, ())), room


def test_no_private_names_imported_across_modules() -> None:
    offenders = []
    for path in sorted([*(ROOT / "workers").rglob("*.py"), *(ROOT / "schema").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("workers", "schema"):
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_no_reach_into_flock_objects() -> None:
    """`# noqa: SLF001` marks a private access; only third-party internals with no public way
    (aiokafka's metadata refresh, the stdlib shared-memory name) may need one."""
    allowed = ("._client.force_metadata_update", "self.shm._name")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "workers").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "SLF001" in line and not any(a in line for a in allowed)]
    assert offenders == []


def test_graph_reads_every_module() -> None:
    mods = module_imports()
    assert "workers.engine.runtime" in mods and "schema.layout" in mods
    assert package_of("workers.engine.pets.lora") == "workers.engine.pets"
    assert package_of("workers.client") == "workers"


def test_docs_diagram_is_the_code_as_it_stands() -> None:
    """docs/architecture.md embeds the generated graph; regenerate with
    `python scripts/import_graph.py --write-docs` when rooms change."""
    from import_graph import DOC_BEGIN, DOC_END, mermaid
    doc = (ROOT / "docs" / "architecture.md").read_text()
    embedded = doc.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()
    assert embedded == mermaid().strip()
