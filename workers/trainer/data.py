"""Training data: JSONL or CSV rows -> Examples, with one-line TrainDataError on bad input.

Sequence classification: ``text`` (+ optional ``text_pair``) and ``label``.
Token classification: ``tokens`` (list of words) and ``tags`` (one label per word); in CSV both
are space-separated strings.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from schema.layout import MAX_LABELS, TASKS

MAX_ROWS = 1_000_000  # per data set (a training set, not a corpus)
MAX_TEXT_CHARS = 100_000  # per text field / per token list (joined)
MAX_FILE_BYTES = 512 * 1024 * 1024


class TrainDataError(ValueError):
    """Training data that cannot be used; the message says why, in one line."""


@dataclass
class Examples:
    task: str  # "seq_cls" | "token_cls"
    texts: list[str] = field(default_factory=list)  # seq_cls
    pairs: list[str | None] = field(default_factory=list)  # seq_cls, None = single text
    labels: list[str] = field(default_factory=list)  # seq_cls: one label per row
    tokens: list[list[str]] = field(default_factory=list)  # token_cls: words per row
    tags: list[list[str]] = field(default_factory=list)  # token_cls: one label per word

    def __len__(self) -> int:
        return len(self.labels) if self.task == "seq_cls" else len(self.tokens)

    def label_set(self) -> list[str]:
        """Distinct labels in first-seen order."""
        seen = self.labels if self.task == "seq_cls" else (t for row in self.tags for t in row)
        return list(dict.fromkeys(seen))

    def subset(self, idx: Sequence[int]) -> "Examples":
        if self.task == "seq_cls":
            return Examples(self.task, [self.texts[i] for i in idx], [self.pairs[i] for i in idx],
                            [self.labels[i] for i in idx])
        return Examples(self.task, tokens=[self.tokens[i] for i in idx], tags=[self.tags[i] for i in idx])

    def check_labels(self, labels: Sequence[str]) -> None:
        known = set(labels)
        unknown = [x for x in self.label_set() if x not in known]
        if unknown:
            raise TrainDataError(f"labels not in the label set {list(labels)[:8]}: {unknown[:5]}")

    def to_rows(self) -> list[dict[str, Any]]:
        """Rows in the input format (JSON-able): what load_examples reads back."""
        if self.task == "seq_cls":
            return [{"text": t, **({"text_pair": p} if p is not None else {}), "label": y}
                    for t, p, y in zip(self.texts, self.pairs, self.labels)]
        return [{"tokens": w, "tags": g} for w, g in zip(self.tokens, self.tags)]


def _read_rows(path: Path) -> list[Mapping[str, Any]]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise TrainDataError(f"cannot read {path}: {e.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise TrainDataError(f"{path}: {size} bytes exceeds the limit of {MAX_FILE_BYTES}")
    text = path.read_text(encoding="utf-8", errors="strict")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainDataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TrainDataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
        return rows
    raise TrainDataError(f"{path}: unknown data format {suffix!r}; use .jsonl or .csv")


def _words(v: Any, what: str, n: int) -> list[str]:
    if isinstance(v, str):
        v = v.split()
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise TrainDataError(f"row {n}: {what} must be a non-empty list of strings")
    return v


def load_examples(source: str | Path | Iterable[Mapping[str, Any]], task: str = "seq_cls",
                  max_rows: int = MAX_ROWS) -> Examples:
    """Read and check a data set: a .jsonl / .csv path, or rows (dicts) already in memory."""
    if task not in TASKS:
        raise TrainDataError(f"task must be one of {list(TASKS)}")
    if isinstance(source, (str, Path)):
        rows = _read_rows(Path(source))
    else:
        rows = list(source)
    if not rows:
        raise TrainDataError("the data set is empty")
    if len(rows) > max_rows:
        raise TrainDataError(f"{len(rows)} rows exceeds the limit of {max_rows}")
    ex = Examples(task)
    need = ("text", "label") if task == "seq_cls" else ("tokens", "tags")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise TrainDataError(f"row {n}: must be an object with {list(need)}")
        missing = [c for c in need if row.get(c) in (None, "")]
        if missing:
            raise TrainDataError(f"row {n}: missing column(s) {missing} (a {task} row needs {list(need)}"
                                 + (" and optionally text_pair)" if task == "seq_cls" else ")"))
        if task == "seq_cls":
            text, label, pair = row["text"], row["label"], row.get("text_pair") or None
            if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
                raise TrainDataError(f"row {n}: text and text_pair must be strings")
            if len(text) > MAX_TEXT_CHARS or (pair and len(pair) > MAX_TEXT_CHARS):
                raise TrainDataError(f"row {n}: text longer than {MAX_TEXT_CHARS} characters")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise TrainDataError(f"row {n}: label must be a string (or an integer class id)")
            ex.texts.append(text)
            ex.pairs.append(pair)
            ex.labels.append(str(label))
        else:
            words, tags = _words(row["tokens"], "tokens", n), _words(row["tags"], "tags", n)
            if len(words) != len(tags):
                raise TrainDataError(f"row {n}: {len(words)} tokens but {len(tags)} tags")
            if sum(map(len, words)) > MAX_TEXT_CHARS:
                raise TrainDataError(f"row {n}: tokens longer than {MAX_TEXT_CHARS} characters")
            ex.tokens.append(words)
            ex.tags.append(tags)
    n_labels = len(ex.label_set())
    if n_labels > MAX_LABELS:
        raise TrainDataError(f"{n_labels} distinct labels exceeds the limit of {MAX_LABELS}")
    return ex
