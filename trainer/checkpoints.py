"""Checkpoints that are complete or ignored, and ``resume=auto``.

``Trainer`` writes ``<run>/checkpoints/checkpoint-N/`` (weights, optimizer, scheduler, RNG states of every rank,
trainer state with the data position) and then calls ``on_save``. Only there — after every rank has written its part
— the main process marks the directory ``COMPLETE`` (written to a temporary name, then renamed, so the marker itself
is never half-written). A run killed mid-save leaves a directory without the marker, which ``last_complete`` skips.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling and a rename: a reader, or a run killed mid-write, never sees half
    a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class MarkComplete(TrainerCallback):
    """Marks each checkpoint complete once every rank has written it."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank-specific files (RNG states) are written by each rank before its on_save
        if not state.is_world_process_zero:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            write_atomic(directory / MARKER, json.dumps({"step": state.global_step}))


def last_complete(output_dir: Path | str) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir``, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / MARKER).exists()]
    return max(steps)[1] if steps else None


def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the logged rows after ``step`` (the resumed run logs them again) and any torn line, atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if row.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
