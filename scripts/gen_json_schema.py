"""Write schema/*.json from the Python wire definitions (tests keep them equal)."""

import json
from pathlib import Path

from schema.messages import SCHEMA_VERSION, json_schema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"


def render(kind: str) -> str:
    return json.dumps(json_schema(kind), indent=2, sort_keys=True) + "\n"


def path_of(kind: str) -> Path:
    return SCHEMA_DIR / f"infer_{kind}.v{SCHEMA_VERSION}.json"


if __name__ == "__main__":
    for kind in ("request", "reply"):
        path_of(kind).write_text(render(kind))
        print("wrote", path_of(kind))
