"""Who imports whom among Flock's packages, read from the source (AST, nothing is imported).

    python scripts/import_graph.py            # package -> packages it imports, as text
    python scripts/import_graph.py --mermaid  # the same as a Mermaid graph
    python scripts/import_graph.py --write-docs  # refresh the graph in docs/architecture.md

``tests/test_architecture.py`` uses :func:`package_edges` and :func:`module_imports` to hold the
layering rules (the engine knows nothing of Kafka, schema/ imports nothing of workers/, ...).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("schema", "workers")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_imports() -> dict[str, set[str]]:
    """Module -> every absolute module name it imports (relative imports resolved)."""
    out: dict[str, set[str]] = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            mod = _module_name(path)
            pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = pkg.split(".")
                        base = base[:len(base) - node.level + 1]
                        stem = ".".join(base + ([node.module] if node.module else []))
                    else:
                        stem = node.module or ""
                    names.add(stem)
                    names.update(f"{stem}.{a.name}" for a in node.names)
            out[mod] = names
    return out


def package_of(module: str) -> str:
    """The room a module lives in: ``schema``, ``workers.engine``, ``workers.engine.pets``, ...;
    top-level ``workers.*`` modules (cli, config, db, ...) are the ``workers`` room."""
    parts = module.split(".")
    if parts[0] == "schema":
        return "schema"
    if len(parts) >= 2 and (ROOT / "workers" / parts[1]).is_dir():
        if len(parts) >= 3 and (ROOT / "workers" / parts[1] / parts[2]).is_dir():
            return ".".join(parts[:3])
        return ".".join(parts[:2])
    return "workers"


def package_edges() -> dict[str, set[str]]:
    """Room -> the other Flock rooms it imports from."""
    known = set(module_imports())
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, names in module_imports().items():
        src = package_of(mod)
        edges.setdefault(src, set())
        for n in names:
            if n.split(".")[0] not in SOURCES:
                continue
            target = n if n in known else n.rpartition(".")[0]
            if target in known or target in SOURCES:
                dst = package_of(target)
                if dst != src:
                    edges[src].add(dst)
    return dict(edges)


DOCS = ROOT / "docs" / "architecture.md"
DOC_BEGIN, DOC_END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"


def mermaid() -> str:
    edges = package_edges()
    lines = ["```mermaid", "flowchart BT"]
    lines += [f"  {src.replace('.', '_')}[{src}] --> {dst.replace('.', '_')}[{dst}]"
              for src in sorted(edges) for dst in sorted(edges[src])]
    return "\n".join(lines + ["```"])


def write_docs() -> None:
    doc = DOCS.read_text()
    head, rest = doc.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    DOCS.write_text(f"{head}{DOC_BEGIN}\n{mermaid()}\n{DOC_END}{tail}")


def main(argv: list[str]) -> None:
    edges = package_edges()
    if "--mermaid" in argv:
        print(mermaid())
        return
    if "--write-docs" in argv:
        write_docs()
        return
    width = max(map(len, edges))
    for src in sorted(edges):
        print(f"{src:<{width}}  -> {', '.join(sorted(edges[src])) or '(nothing)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
