"""The launch commands of ``docs/launch.md`` marked *tested*, run verbatim (a free port and small-run overrides
appended): one node with two processes, two "nodes" on loopback, the DeepSpeed launcher (which appends
``--local_rank``, which Hydra would reject) and ``accelerate launch``; every rank finishes and all share one run
directory."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["warmup.steps=30", "trainer.max_steps=3", "trainer.prompts_per_step=4", "trainer.num_generations=4",
         "trainer.logging_steps=1", "task.train_size=64", "task.eval_size=16", "eval.batch_size=16",
         "tracking.wandb=disabled"]

pytestmark = pytest.mark.e2e


def documented_block(name: str) -> list[str]:
    """The command lines of the ```bash block after ``<!-- tested: name -->`` in docs/launch.md."""
    text = (ROOT / "docs" / "launch.md").read_text()
    block = re.search(rf"<!-- tested: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"docs/launch.md has no tested block {name!r}"
    return [line.rstrip(" &") for line in block.group(1).strip().splitlines()]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(line: str, root: Path, port: str, overrides: list[str] = SMALL) -> subprocess.Popen:
    words = shlex.split(line)
    # the launcher runs `python` from PATH: the environment the tests run in (an activated venv in .ci/run)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               TOKENSEL_RUN_ID="launch-test")
    while "=" in words[0] and not words[0].startswith(("+", "-")):
        key, value = words.pop(0).split("=", 1)
        env[key] = port if key == "MASTER_PORT" else value
    env.setdefault("MASTER_PORT", port)
    if words[:2] == ["accelerate", "launch"]:  # accelerate takes its port from its config file unless told
        words.insert(2, f"--main_process_port={port}")
    return subprocess.Popen([*words, *overrides, f"run.root={root}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("name", ["one-node", "two-node-loopback", "deepspeed-launcher", "accelerate"])
def test_documented_launch_commands_run(tmp_path, name):
    port = free_port()
    procs = [launch(line, tmp_path, port) for line in documented_block(name)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    run_dirs = [d for d in tmp_path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert [d.name for d in run_dirs] == ["quickstart-launch-test"]  # one directory for every rank
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["rl_steps"] == 3
    assert summary["world_size"] == (1 if name == "deepspeed-launcher" else 2)
