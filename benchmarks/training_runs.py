"""Shared by the training-run benchmarks: one ``python -m trainer`` run in a fresh process, read back.

A run is ``+experiment=<experiment>`` plus overrides, at a seed and a number of steps, with held-out evaluations every
``eval_every`` steps, every step logged, W&B off. Returns the summary, the logged rows and the held-out curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Settings of --quick (seconds per run): a few prompts, a short warm-up, a small held-out set.
QUICK = ["warmup.steps=30", "trainer.prompts_per_step=4", "trainer.num_generations=4", "task.train_size=64",
         "task.eval_size=16", "eval.batch_size=16"]


def run_training(experiment: str, name: str, seed: int, steps: int, eval_every: int, root: Path, threads: int,
                 quick: bool, overrides: tuple[str, ...] = ()) -> dict:
    """Run one experiment; ``{"summary", "rows", "curve"}`` (curve: held-out accuracy at 0, every eval, the end)."""
    cmd = [sys.executable, "-m", "trainer", f"+experiment={experiment}", f"seed={seed}", f"run.root={root}",
           f"run.name={name}", f"trainer.max_steps={steps}", f"eval.every={eval_every}", "trainer.logging_steps=1",
           "tracking.wandb=disabled", f"run.threads={threads}", *(QUICK if quick else []), *overrides]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((root / name / "summary.json").read_text())
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": 0, "sampled": summary["sampled_accuracy_before"], "greedy": summary["greedy_accuracy_before"]}]
    curve += [{"step": r["step"], "sampled": r.get("eval/accuracy_sampled"), "greedy": r.get("eval/accuracy_greedy")}
              for r in rows if "eval/accuracy_greedy" in r]
    curve.append({"step": summary["rl_steps"], "sampled": summary["sampled_accuracy_after"],
                  "greedy": summary["greedy_accuracy_after"]})
    return {"summary": summary, "rows": rows, "curve": curve}


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean of a logged metric over the steps that logged it."""
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def plot_mean_curves(ax, runs: list[dict], methods, xlabel: str, title: str) -> None:
    """Held-out sampled accuracy against steps, the mean over seeds, one line per method (in ``methods`` order);
    ``title`` gets ", mean of N seeds"."""
    import statistics

    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if rs:
            steps = [p["step"] for p in rs[0]["curve"]]
            acc = [statistics.fmean(r["curve"][i]["sampled"] for r in rs) for i in range(len(steps))]
            ax.plot(steps, [100 * a for a in acc], marker="o", label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out sampled Pass@1 (%)")
    ax.set_title(f"{title}, mean of {len({r['seed'] for r in runs})} seeds")
    if ax.get_lines():
        ax.legend(fontsize=8)


def run_arguments(doc: str, methods: list[str]) -> argparse.ArgumentParser:
    """The command line shared by the training-run benchmarks."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=200, help="RL steps per run (the experiments' own setting: 200)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", help="run directory root (default: a temporary directory)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny settings, 2 steps (seconds); for the schema test")
    return ap


def run_jobs(args: argparse.Namespace, run_one: Callable[[str, int, Path], dict], desc: str) -> list[dict]:
    """``run_one(method, seed, root)`` for every seed × method, in a temporary root unless ``--root`` is given."""
    from tqdm.auto import tqdm

    if args.quick:
        args.steps, args.eval_every = 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        jobs = [(m, s) for s in args.seeds for m in args.methods]
        return [run_one(m, s, root) for m, s in tqdm(jobs, desc=desc)]
