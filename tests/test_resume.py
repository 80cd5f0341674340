"""A run killed with SIGKILL and restarted with ``resume=auto`` ends bit-identical to an uninterrupted run (CPU,
fixed seed) and continues the same W&B run; a checkpoint without its completion marker is never picked up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import MARKER, last_complete, truncate_metrics

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["+experiment=quickstart", "warmup.steps=30", "trainer.max_steps=16", "trainer.save_steps=2",
        "trainer.prompts_per_step=16", "trainer.num_generations=4", "trainer.logging_steps=1", "task.train_size=256",
        "task.eval_size=8", "eval.batch_size=8", "eval.samples=1", "tracking.wandb=offline", "resume=auto"]


def command(root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *ARGS, f"run.root={root}", f"run.name={name}"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "WANDB_API_KEY": "", "OMP_NUM_THREADS": "2"}


def run(cmd: list[str]) -> None:
    """Run to completion; a failure shows the run's own stderr, not only its exit status."""
    out = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-6000:]}"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.mark.e2e
def test_killed_run_resumes_bit_identical(tmp_path):
    run(command(tmp_path, "straight"))

    proc = subprocess.Popen(command(tmp_path, "killed"), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while last_complete(ckpts) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    run_id = (tmp_path / "killed" / "wandb_run_id").read_text()

    run(command(tmp_path, "killed"))
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["rl_steps"] == 16
    assert summary["wandb"]["id"] == run_id  # the same W&B run continues
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 3]) == 1  # no step logged twice


def test_incomplete_checkpoints_are_skipped_and_metrics_truncated(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete(tmp_path / "missing") is None
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5, 6)) + '{"step": 7, "lo')
    truncate_metrics(metrics, 4)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_run_does_not_join_an_inherited_wandb_service(tmp_path, monkeypatch):
    """A parent's ``WANDB_SERVICE`` token (here unparsable, in the full suite a live service of the test process)
    must not be used: a killed run's stream would stay open there and refuse the resumed run's id."""
    from trainer.tracking import init_wandb

    monkeypatch.setenv("WANDB_SERVICE", "not-a-service-token")
    monkeypatch.setenv("WANDB_API_KEY", "")
    run = init_wandb(tmp_path, "offline", "tokensel-test", None, "svc", {})
    try:
        assert run.id == (tmp_path / "wandb_run_id").read_text()
        assert os.environ.get("WANDB_SERVICE") != "not-a-service-token"
    finally:
        run.finish()
