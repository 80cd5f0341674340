"""Tasks whose rows come from a file or the HF Hub: local JSONL / JSON / Parquet, or a dataset id.

Rows are validated up front; a malformed row fails with the file, the row (line) number and what is wrong.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Row, Task

BUNDLED = Path(__file__).resolve().parent.parent / "data"
ANSWER_FORMATS = ("exact", "number", "gsm8k")
_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass
class FileTaskConfig:
    name: str = "file"
    source: str = ""  # .jsonl/.json/.parquet path, "bundled:<file>", or an HF dataset id
    split: str = "train"  # HF split (ignored for local files)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    solution_field: str | None = None  # demonstrations for the warm-up; null -> answer_field
    answer_format: str = "exact"  # exact | number | gsm8k ("#### <number>")
    prompt_template: str = "{prompt}"  # how a row's prompt is shown to the model
    eval_size: int = 200  # rows held out (taken from the end after a seeded shuffle)
    train_size: int | None = None  # cap on training rows; null = all the rest

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(f"task {self.name!r} needs task.source (a .jsonl/.parquet path or an HF dataset id)")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")


@dataclass
class GSM8KConfig(FileTaskConfig):
    name: str = "gsm8k"
    source: str = "bundled:gsm8k_sample.jsonl"  # real data: openai/gsm8k (config "main") or a local copy
    prompt_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "gsm8k"
    prompt_template: str = "Question: {prompt}\nAnswer:"
    eval_size: int = 2


def canonical_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``; ``None`` if not a number."""
    try:
        value = float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's final-answer marker), canonicalised."""
    found = _GSM8K.findall(text)
    return canonical_number(found[-1]) if found else None


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/Parquet file, a bundled file, or an HF dataset (network only for the last)."""
    if source.startswith("bundled:"):
        source = str(BUNDLED / source.removeprefix("bundled:"))
    path = Path(source)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and path.exists()):
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        return _read_json_lines(path) if path.suffix == ".jsonl" else _read_json(path)
    if path.suffix == ".parquet":
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.exists():
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    from datasets import load_dataset  # a hub id: the only path that needs the network

    name, _, config = source.partition(":")
    return list(load_dataset(name, config or None, split=split))


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return data


class FileTask(Task):
    name = "file"

    def __init__(self, config: FileTaskConfig) -> None:
        super().__init__(config)
        self.name = config.name

    def _row(self, raw: dict[str, Any], where: str) -> Row:
        c = self.config
        fields = [c.prompt_field, c.answer_field] + ([c.solution_field] if c.solution_field else [])
        for f in fields:
            if f not in raw:
                raise ValueError(f"{where}: missing field {f!r} (fields present: {', '.join(map(str, raw)) or 'none'})")
            if not isinstance(raw[f], str | int | float) or isinstance(raw[f], bool):
                raise ValueError(f"{where}: field {f!r} must be a string or number, got {type(raw[f]).__name__}")
        answer_text = str(raw[c.answer_field])
        answer = self.canonical(answer_text, reference=True)
        if answer is None:
            raise ValueError(f"{where}: cannot read a {c.answer_format!r} answer from {answer_text[:80]!r}")
        solution = str(raw[c.solution_field]) if c.solution_field else answer_text
        return {"prompt": c.prompt_template.format(prompt=raw[c.prompt_field]), "answer": answer, "solution": solution}

    def splits(self, seed: int) -> tuple[list[Row], list[Row]]:
        c = self.config
        raw = read_rows(c.source, c.split)
        rows = [self._row(r, f"{c.source}: row {i}") for i, r in enumerate(raw)]
        if len(rows) <= c.eval_size:
            raise ValueError(f"{c.source}: {len(rows)} rows, need more than eval_size={c.eval_size}")
        random.Random(seed).shuffle(rows)
        train, held_out = rows[: len(rows) - c.eval_size], rows[len(rows) - c.eval_size :]
        return (train[: c.train_size] if c.train_size else train), held_out

    def canonical(self, text: str, reference: bool = False) -> str | None:
        fmt = self.config.answer_format
        if fmt == "gsm8k":
            return gsm8k_answer(text)
        if fmt == "number":
            found = _NUMBER.findall(text)
            return canonical_number(found[0] if reference else found[-1]) if found else None
        return text.strip() or None

    def extract(self, completion: str) -> str | None:
        return self.canonical(completion)

    def score(self, completion: str, row: Row) -> float:
        got = self.extract(completion)
        return 1.0 if got is not None and got == row["answer"] else 0.0
