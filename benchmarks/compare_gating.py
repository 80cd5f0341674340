"""PPO/GRPO clipping vs GSPO vs FiberPO vs FiberPO-Domain off-policy, on the tiny model and two domains.

    python -m benchmarks.compare_gating [--seeds 0 1] [--steps 200] [--eval-every 50] [--out benchmarks/results]

Every method runs the ``fiberpo`` experiment's setting — addition + subtraction (``task=arithmetic_mixed``), 64 prompts
× 8 rollouts per generation batch, each batch reused for 4 optimizer steps (``num_iterations = 4``, so the policy
drifts from the behaviour policy and the trust regions matter) — with only the objective changed:

* ``grpo_clip``: TRL 1.16's token-level clipping (ε = 0.2) with the per-sequence (``grpo``) aggregation FiberPO uses;
* ``gspo``: TRL's ``importance_sampling_level="sequence"``, ε = 3e-4 / 4e-4 (the GSPO paper's range);
* ``fiberpo``: base + fiber gates, ε = C± = 0.2;
* ``fiberpo_domain``: the same plus domain and prompt-group base gates.

Recorded per run: held-out accuracy every ``--eval-every`` steps, the RL loop's wall time, and per-step gate
diagnostics averaged over the run (clip fractions for the clipping methods; FiberPO's global regimes, clipped fiber
numerators, restorative tokens, fully censored trajectories, drift, level regimes). Writes
``compare_gating_cpu.json`` / ``.png``; only the schema is tested (``--quick``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.token_stats import environment
from benchmarks.training_runs import mean_of, plot_mean_curves, run_arguments, run_jobs, run_training

METHODS = {
    "grpo_clip": ("fiberpo", ("objective=grpo", "objective.loss_type=grpo")),
    "gspo": ("fiberpo", ("objective=gspo",)),
    "fiberpo": ("fiberpo", ()),
    "fiberpo_domain": ("fiberpo_domain", ()),
}
CLIP_KEYS = ("clip_frac", "clip_low_frac", "clip_high_frac")
FIBER_KEYS = ("kept_token_frac", "fiber_num_clip_frac", "restorative_token_frac", "traj_fully_censored_frac",
              "drift_abs_mean", "drift_rkl_mean", "base/pos_rollback_frac", "base/pos_zeroed_frac",
              "base/neg_rollback_frac", "base/neg_zeroed_frac", "level/domain/pos_zeroed_frac",
              "level/domain/neg_zeroed_frac", "level/group/pos_zeroed_frac", "level/group/neg_zeroed_frac",
              "level_context_approx_frac")
REGIMES = ("G1", "G2r", "G2", "G3r", "G3", "G3rz")


def run_one(method: str, seed: int, args, root: Path) -> dict:
    experiment, overrides = METHODS[method]
    run = run_training(experiment, f"{method}-seed{seed}", seed, args.steps, args.eval_every, root, args.threads,
                       args.quick, overrides)
    s, rows = run["summary"], run["rows"]
    prefix = "objective/grpo/" if method in ("grpo_clip", "gspo") else "objective/fiberpo/"
    keys = CLIP_KEYS if method in ("grpo_clip", "gspo") else FIBER_KEYS + tuple(f"regime/{r}_frac" for r in REGIMES)
    gates = {k: mean_of(rows, prefix + k) for k in keys}
    return {"method": method, "seed": seed, "curve": run["curve"], "rl_seconds": s["rl_seconds"],
            "accuracy_before": s["sampled_accuracy_before"], "accuracy_after": s["sampled_accuracy_after"],
            "greedy_before": s["greedy_accuracy_before"], "greedy_after": s["greedy_accuracy_after"],
            "gates": {k: v for k, v in gates.items() if v is not None}}


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for k in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after", "rl_seconds"):
            row[k] = statistics.fmean(r[k] for r in rs)
        row["gates"] = {k: statistics.fmean(r["gates"][k] for r in rs) for k in rs[0]["gates"]}
        out.append(row)
    return out


def plot(runs: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_mean_curves(axes[0], runs, METHODS, "RL step", "off-policy (4 steps per batch)")
    fiber = [s for s in summary if s["method"].startswith("fiberpo")]
    bottom = [0.0] * len(fiber)
    for regime in REGIMES:
        vals = [100 * s["gates"].get(f"regime/{regime}_frac", 0.0) for s in fiber]
        axes[1].bar([s["method"] for s in fiber], vals, bottom=bottom, label=regime)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[1].set_ylabel("trajectories (%)")
    axes[1].set_title("FiberPO global regimes (mean over steps)")
    axes[1].legend(fontsize=7)
    names = [s["method"] for s in summary]
    token_gate = [100 * (s["gates"].get("clip_frac") if "clip_frac" in s["gates"]
                         else s["gates"].get("fiber_num_clip_frac", 0.0)) for s in summary]
    axes[2].bar(names, token_gate)
    axes[2].set_ylabel("tokens whose direct term is gated (%)")
    axes[2].set_title("clip fraction / FiberPO clipped fiber numerators")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("Trust regions off-policy on the tiny model (CPU): clipping vs GSPO vs FiberPO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = run_arguments(__doc__, list(METHODS)).parse_args(argv)
    runs = run_jobs(args, lambda m, seed, root: run_one(m, seed, args, root), "gating runs")
    summary = summarise(runs)
    report = {"benchmark": "compare_gating", "quick": args.quick, "environment": environment(args.threads),
              "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "num_iterations": 4,
              "runs": runs, "summary": summary}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_gating_cpu.json").write_text(json.dumps(report, indent=2))
    plot(runs, summary, out / "compare_gating_cpu.png")
    print(f"\n{'method':<16}{'sampled before→after':>24}{'greedy after':>14}{'RL s':>8}  gates")
    for s in summary:
        gates = ", ".join(f"{k} {v:.3f}" for k, v in s["gates"].items() if "frac" in k and v > 0)
        print(f"{s['method']:<16}{100 * s['accuracy_before']:>11.1f} → {100 * s['accuracy_after']:<9.1f}"
              f"{100 * s['greedy_after']:>13.1f}{s['rl_seconds']:>8.0f}  {gates}")
    print(f"wrote {out / 'compare_gating_cpu.json'} and {out / 'compare_gating_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
