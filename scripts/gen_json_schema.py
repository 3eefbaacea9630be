"""Write schema/*.json from the Python wire definitions (tests keep them equal)."""

import json
from pathlib import Path

from schema import train
from schema.messages import SCHEMA_VERSION, json_schema

TRAIN_KINDS = ("train_job", "train_reply")  # schema/train.py: the flock.train contract

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"


def render(kind: str) -> str:
    doc = train.json_schema(kind.removeprefix("train_")) if kind in TRAIN_KINDS else json_schema(kind)
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def path_of(kind: str) -> Path:
    return SCHEMA_DIR / (f"{kind}.v{SCHEMA_VERSION}.json" if kind in TRAIN_KINDS
                         else f"infer_{kind}.v{SCHEMA_VERSION}.json")


if __name__ == "__main__":
    for kind in ("request", "reply", *TRAIN_KINDS):
        path_of(kind).write_text(render(kind))
        print("wrote", path_of(kind))
