"""Tracking: a JSONL metrics file always; W&B on rank 0 only, offline unless an API key is configured.

The W&B run id is stored in the run directory (``wandb_run_id``), so a resumed run continues the same W&B run.
Metric names: ``objective/<name>/...`` as the objective reports them, everything else from TRL under ``train/``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .checkpoints import write_atomic


def wandb_mode(setting: str) -> str:
    """auto -> online when an API key is configured (env or ~/.netrc), else offline."""
    if setting != "auto":
        return setting
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def init_wandb(run_dir: Path, setting: str, project: str, entity: str | None, name: str, config: dict[str, Any]):
    """Start (or resume) the W&B run of ``run_dir``; ``None`` when disabled. Call on rank 0 only."""
    mode = wandb_mode(setting)
    if mode == "disabled":
        return None
    import wandb

    # A service token inherited from a parent process (one that used wandb itself, e.g. a test runner or a sweep
    # driver) would put this run's stream into the parent's wandb-core service. That service outlives a killed run
    # and then refuses the resumed run's id ("run ID ... is in use"): a training run owns its own service.
    os.environ.pop("WANDB_SERVICE", None)
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id:  # absent, or emptied by a kill before the first write finished
        run_id = secrets.token_hex(4)
        write_atomic(id_file, run_id)
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(run_dir),
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )


def metric_name(key: str) -> str:
    return key if key.startswith(("objective/", "train/", "eval/", "timing/", "kernels/")) else f"train/{key}"


class MetricsCallback(TrainerCallback):
    """Writes every TRL log to ``metrics.jsonl`` (and W&B) on the main process; keeps what the summary needs."""

    def __init__(self, path: Path, wandb_run=None, objective_name: str = "") -> None:
        self.path = path
        self.wandb_run = wandb_run
        self.kept_key = f"objective/{objective_name}/kept_token_frac"
        self.kept: list[float] = []
        self.rewards: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {metric_name(k): v for k, v in logs.items() if _is_number(v)}
        if self.kept_key in record:
            self.kept.append(record[self.kept_key])
        if "train/reward" in record:
            self.rewards.append(record["train/reward"])
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **record}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=state.global_step)


class CompactProgress(ProgressCallback):
    """The RL progress bar with reward and kept fraction in its postfix, instead of a printed dict per log.

    Every logged value still goes to ``metrics.jsonl`` and W&B (:class:`MetricsCallback`).
    """

    def __init__(self, objective_name: str = "") -> None:
        super().__init__()
        self.kept_key = f"objective/{objective_name}/kept_token_frac"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {"reward": logs.get("reward"), "kept": logs.get(self.kept_key), "loss": logs.get("loss")}
        self.training_bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if _is_number(v)}, refresh=False)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_wandb_history(path: Path | str) -> list[dict[str, Any]]:
    """History rows of a W&B run file (``run-<id>.wandb``), read offline without the W&B service.

    The file is a 7-byte ``:W&B`` header followed by a LevelDB-style log (32 KiB blocks, 7-byte record headers,
    zero trailers) of protobuf ``Record`` messages; ``history`` records hold the logged metrics as JSON values.
    wandb-core's Go writer counts its blocks from the end of the file header (offset 7), the old Python writer from
    offset 0: reading with the wrong origin fails only when a record meets a block edge, so both are tried.
    """
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    errors = []
    for origin in (7, 0):
        try:
            return _history_rows(data, origin)
        except ValueError as err:
            errors.append(f"block origin {origin}: {err}")
    raise ValueError(f"{path}: cannot parse the W&B log ({'; '.join(errors)})")


def _history_rows(data: bytes, origin: int) -> list[dict[str, Any]]:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - (pos - origin) % block
        if left < 7:  # block trailer too small for a header: skip to the next block
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if kind > 4 or length > left - 7:
            raise ValueError(f"bad record header at byte {pos}")
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4) and pending:
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError as err:
                raise ValueError(f"corrupt record ending at byte {pos}") from err
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            pending = b""
    return rows
