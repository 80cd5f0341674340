"""GRPO vs SPINE vs D³S (labelled reward) and TTRL vs TTRL+SPINE (label-free) on the tiny model, same rollouts.

    python -m benchmarks.compare_grpo_family [--seeds 0 1] [--steps 200] [--eval-every 50] [--out benchmarks/results]

Every method is one ``python -m trainer +experiment=<method>`` run in a fresh process, with the experiment's own
settings (the quickstart's: 1–2 digit addition from noisy demonstrations, 64 prompts × 8 rollouts per step, the same
cached warm-up per seed), the same number of steps and seeds. ``grpo_top_entropy`` is TRL 1.16's
``top_entropy_quantile = 0.2`` (bit-identical mask, tested), ``grpo`` TRL's plain loss (tested). Recorded per run:
held-out accuracy (sampled Pass@1, mean of 4 samples at T = 1, and greedy) every ``--eval-every`` steps, tokens with a
policy gradient (kept fraction × valid completion tokens, summed over steps), rows of the LM-head backward, and the
RL loop's wall time without the evaluations. Writes ``compare_grpo_family_cpu.json`` / ``.png``. Nothing here is
asserted in tests beyond the schema (``--quick``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.token_stats import environment
from benchmarks.training_runs import plot_mean_curves, run_arguments, run_jobs, run_training

LABELLED = ("grpo", "grpo_top_entropy", "spine", "d3s")
LABEL_FREE = ("ttrl", "ttrl_spine")
PROMPTS_X_G = {False: 64 * 8, True: 4 * 4}  # rollouts per step of the experiments (and of --quick)
OBJECTIVE = {"grpo": "grpo", "grpo_top_entropy": "grpo", "spine": "entropy_band", "d3s": "d3s", "ttrl": "grpo",
             "ttrl_spine": "entropy_band"}


def run_one(method: str, seed: int, args, root: Path) -> dict:
    """One training run in a fresh process; its curves, tokens trained and wall time."""
    quick = args.quick
    run = run_training(method, f"{method}-seed{seed}", seed, args.steps, args.eval_every, root, args.threads, quick)
    summary, rows = run["summary"], run["rows"]
    prefix = f"objective/{OBJECTIVE[method]}/"
    tokens_trained = valid_tokens = rows_backward = 0.0
    for r in rows:
        if "train/completions/mean_length" not in r:
            continue
        # valid completion tokens of the whole step (all rollouts), then the kept fraction of them
        step_tokens = r["train/completions/mean_length"] * PROMPTS_X_G[quick]
        valid_tokens += step_tokens
        tokens_trained += r.get(prefix + "kept_token_frac", 1.0) * step_tokens
        rows_backward += r.get("kernels/rows_backward", 0.0)
    return {
        "method": method, "seed": seed, "curve": run["curve"], "rl_seconds": summary["rl_seconds"],
        "tokens_trained": tokens_trained, "valid_tokens": valid_tokens,
        "trained_fraction": tokens_trained / valid_tokens if valid_tokens else None,
        "head_rows_backward": rows_backward,
        "reward_first": summary["mean_reward_first_log"], "reward_last": summary["mean_reward_last_log"],
        "accuracy_before": summary["sampled_accuracy_before"], "accuracy_after": summary["sampled_accuracy_after"],
        "greedy_before": summary["greedy_accuracy_before"], "greedy_after": summary["greedy_accuracy_after"],
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Mean over seeds per method, with the gain over the method's baseline (grpo, or ttrl when label-free)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]

        def mean(key, rows=rs):
            vals = [r[key] for r in rows if r[key] is not None]
            return statistics.fmean(vals) if vals else None

        out.append({"method": method, "seeds": [r["seed"] for r in rs], "label_free": method in LABEL_FREE,
                    **{k: mean(k) for k in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after",
                                            "trained_fraction", "tokens_trained", "head_rows_backward",
                                            "rl_seconds", "reward_last")}})
    for row in out:
        base = next((b for b in out if b["method"] == ("ttrl" if row["label_free"] else "grpo")), None)
        if base and base is not row and base["rl_seconds"]:
            row["time_vs_baseline"] = row["rl_seconds"] / base["rl_seconds"]
            row["tokens_vs_baseline"] = row["tokens_trained"] / base["tokens_trained"]
    return out


def plot(runs: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, methods, title in ((axes[0], LABELLED, "labelled reward"), (axes[1], LABEL_FREE, "label-free (TTRL)")):
        plot_mean_curves(ax, runs, methods, "RL step", title)
    names = [s["method"] for s in summary]
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [100 * (s["trained_fraction"] or 0) for s in summary], 0.4,
                label="tokens with gradient (%)")
    ax2 = axes[2].twinx()
    ax2.bar([i + 0.2 for i in x], [s["rl_seconds"] for s in summary], 0.4, color="tab:orange", label="RL seconds")
    axes[2].set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_ylabel("tokens with gradient (%)")
    ax2.set_ylabel("RL wall time (s)")
    axes[2].legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle("GRPO family on the tiny model: same rollouts per step, same steps and seeds (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = run_arguments(__doc__, [*LABELLED, *LABEL_FREE]).parse_args(argv)
    runs = run_jobs(args, lambda m, seed, root: run_one(m, seed, args, root), "grpo family runs")
    summary = summarise(runs)
    report = {"benchmark": "compare_grpo_family", "quick": args.quick, "environment": environment(args.threads),
              "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds,
              "rollouts_per_step": PROMPTS_X_G[args.quick], "runs": runs, "summary": summary}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_grpo_family_cpu.json").write_text(json.dumps(report, indent=2))
    plot(runs, summary, out / "compare_grpo_family_cpu.png")
    print(f"\n{'method':<18}{'sampled before→after':>24}{'greedy before→after':>22}{'trained':>9}{'RL s':>8}")
    for s in summary:
        print(f"{s['method']:<18}{100 * s['accuracy_before']:>11.1f} → {100 * s['accuracy_after']:<9.1f}"
              f"{100 * s['greedy_before']:>10.1f} → {100 * s['greedy_after']:<9.1f}"
              f"{100 * (s['trained_fraction'] or 0):>8.1f}%{s['rl_seconds']:>8.0f}")
    print(f"wrote {out / 'compare_grpo_family_cpu.json'} and {out / 'compare_grpo_family_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
