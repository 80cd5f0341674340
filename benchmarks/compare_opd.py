"""On-policy distillation on the tiny pair: all tokens vs TIP's selections, and the loss head by kept fraction.

    python -m benchmarks.compare_opd [--seeds 0 1] [--steps 100] [--eval-every 25] [--out benchmarks/results]

Part 1, training runs (``python -m trainer``, one fresh process each): the student is the quickstart's tiny model
(0.87 M parameters) warmed up on carry-dropping demonstrations; the teacher a 3.4 M-parameter tiny model trained on
the true sums (cached). 64 student rollouts per step, reverse KL on the kept tokens, 100 steps:

* ``trl_distill``: TRL 1.16's own ``DistillationTrainer._compute_loss`` and chunked kernel on every token
  (``distill.head=trl``, rule ``all``: TRL's loss path, proven equal to ``DistillationTrainer`` in the tests);
* ``opd_all``: the same loss through tokensel's kernels;
* ``soft_or_50``: TIP Soft-OR, ``⌊0.5·m_i⌋`` of each rollout's ``m_i`` tokens (the paper's per-sequence budget;
  the answers here are 2–4 tokens long, so it keeps about 38 %);
* ``soft_or_50_pool`` / ``soft_or_20_pool``: Soft-OR with one budget over the step (``budget_scope=global_batch``):
  exactly 50 % / 20 %. A per-sequence budget at 20 % keeps nothing from a rollout shorter than 5 tokens;
* ``entropy_sample_50``: 50 % per rollout sampled ∝ student entropy;  ``q3_20_pool``: Q3-only, 20 % of the step.

Recorded: held-out accuracy every ``--eval-every`` steps, kept-token fraction, the loop's wall time, the mean step
time and the process's peak RSS. Part 2 (``benchmarks/opd_head.py``): the loss pass's LM head at N = 1024 tokens,
d = 256, V = 32768 for keep 1.0 / 0.5 / 0.2 — tokensel vs TRL's chunked kernel vs a logits-materialising loss —
time and peak memory, plus the scoring pass. Writes ``compare_opd_cpu.json`` / ``.png``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.opd_head import head_rows
from benchmarks.token_stats import environment
from benchmarks.training_runs import mean_of, plot_mean_curves, run_arguments, run_jobs, run_training

METHODS = {
    "trl_distill": ("opd_all", ("distill.head=trl",)),
    "opd_all": ("opd_all", ()),
    "soft_or_50": ("tip_soft_or", ()),
    "soft_or_50_pool": ("tip_soft_or", ("objective.budget_scope=global_batch",)),
    "soft_or_20_pool": ("tip_soft_or", ("objective.keep=0.2", "objective.budget_scope=global_batch")),
    "entropy_sample_50": ("tip_entropy_sample", ()),
    "q3_20_pool": ("tip_q3", ()),
}
DISTILL_QUICK = ("trainer.num_generations=1", "distill.teacher.warmup_steps=30")


def run_one(method: str, seed: int, args, root: Path) -> dict:
    experiment, overrides = METHODS[method]
    extra = (*overrides, *DISTILL_QUICK) if args.quick else overrides
    run = run_training(experiment, f"{method}-seed{seed}", seed, args.steps, args.eval_every, root, args.threads,
                       args.quick, extra)
    s, rows = run["summary"], run["rows"]
    return {"method": method, "seed": seed, "curve": run["curve"], "rl_seconds": s["rl_seconds"],
            "accuracy_before": s["sampled_accuracy_before"], "accuracy_after": s["sampled_accuracy_after"],
            "greedy_before": s["greedy_accuracy_before"], "greedy_after": s["greedy_accuracy_after"],
            "teacher_accuracy": s["teacher"]["accuracy"], "kept_token_frac": mean_of(rows, "objective/tip/kept_token_frac"),
            "step_time_s": mean_of(rows, "train/step_time"), "scoring_time_s": mean_of(rows, "objective/tip/scoring_time_s"),
            "peak_rss_mb": s["peak_rss_mb"], "q3_share_kept": mean_of(rows, "objective/tip/q3_share_kept"),
            "rkl_all": mean_of(rows, "objective/tip/rkl_all")}


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for k in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after", "teacher_accuracy",
                  "rl_seconds", "kept_token_frac", "step_time_s", "scoring_time_s", "peak_rss_mb", "q3_share_kept"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.fmean(vals) if vals else None
        out.append(row)
    base = next((s for s in out if s["method"] == "trl_distill"), None)
    for s in out:
        s["step_time_vs_trl"] = s["step_time_s"] / base["step_time_s"] if base and s["step_time_s"] else None
    return out


def plot(runs: list[dict], summary: list[dict], head: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    plot_mean_curves(axes[0], runs, METHODS, "distillation step", "tiny pair (student)")
    teacher = [s["teacher_accuracy"] for s in summary if s["teacher_accuracy"] is not None]
    if teacher:
        axes[0].axhline(100 * statistics.fmean(teacher), color="gray", ls="--", label="teacher")
        axes[0].legend(fontsize=7)
    impls = list(dict.fromkeys(r["impl"] for r in head if r["impl"] != "scoring"))
    keeps = sorted({r["keep"] for r in head}, reverse=True)
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        rs = [next(r for r in head if r["impl"] == impl and r["keep"] == k) for k in keeps]
        xs = [i + j * width for i in range(len(keeps))]
        axes[1].bar(xs, [r["median_ms"] for r in rs], width, label=impl)
        axes[2].bar(xs, [r["peak_extra_mb"] for r in rs], width, label=impl)
    shape = head[0]
    for ax, what in ((axes[1], "loss-pass head fwd+bwd (ms)"), (axes[2], "peak extra RSS (MB)")):
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(keeps))], [f"keep {k}" for k in keeps])
        ax.set_ylabel(what)
        ax.set_title(f"N={shape['N']}, d={shape['d']}, V={shape['V']} (CPU)")
        ax.legend(fontsize=8)
    fig.suptitle("On-policy distillation: TIP token selection vs all tokens, and the LM head by kept fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = run_arguments(__doc__, list(METHODS))
    ap.add_argument("--head-reps", type=int, default=3)
    ap.set_defaults(steps=100, eval_every=25)
    args = ap.parse_args(argv)
    runs = run_jobs(args, lambda m, seed, root: run_one(m, seed, args, root), "distillation runs")
    summary = summarise(runs)
    head = head_rows(args.quick, args.threads, 1 if args.quick else args.head_reps)
    report = {"benchmark": "compare_opd", "quick": args.quick, "environment": environment(args.threads),
              "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "runs": runs,
              "summary": summary, "head": head}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_opd_cpu.json").write_text(json.dumps(report, indent=2))
    plot(runs, summary, head, out / "compare_opd_cpu.png")
    from benchmarks.report import opd_tables

    print(opd_tables(report))
    print(f"wrote {out / 'compare_opd_cpu.json'} and {out / 'compare_opd_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
