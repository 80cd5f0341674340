"""DPO vs TDPO2 vs cDPO vs T-REG on the tiny model, on the same sampled preference pairs.

    python -m benchmarks.compare_dpo [--seeds 0 1 2] [--steps 100] [--eval-every 25] [--out benchmarks/results]

Every method runs its experiment (``dpo``, ``tdpo2``, ``cdpo``, ``treg``): the quickstart's warm tiny model (1–2 digit
addition, carry-dropping demonstrations) samples 8 answers to each of 1024 training prompts; a pair is its most
frequent correct vs its most frequent wrong answer (the same pairs for every method at a seed). cDPO adds
critical-token weights on rejected answers from two LoRA CE models; T-REG adds token rewards from the reference under
a solved vs a wrongly solved example before the prompt. 32 pairs per step, lr 5e-5, β = 0.1, 100 steps.

Recorded per run: held-out accuracy every ``--eval-every`` steps, the implicit-reward margins as trained (weighted)
and unweighted (TRL's ``β·Λ``), reward accuracy, TDPO's KL margin, T-REG's weight, the share of critical rejected
tokens, the loop's wall time. Writes ``compare_dpo_cpu.json`` / ``.png``; only the schema is tested (``--quick``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.token_stats import environment
from benchmarks.training_runs import mean_of, plot_mean_curves, run_arguments, run_jobs, run_training

METHODS = ("dpo", "tdpo2", "cdpo", "treg")
PREFIX = "objective/token_dpo/"
KEYS = ("rewards/margins", "rewards_unweighted/margins", "rewards/accuracies", "kl/margin", "treg/weight",
        "implicit_reward/high_weight", "implicit_reward/low_weight")
QUICK = ("trainer.num_generations=1", "preference.prompts=48", "preference.samples_per_prompt=6",
         "preference.ce_steps=10")


def last_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def run_one(method: str, seed: int, args, root: Path) -> dict:
    run = run_training(method, f"{method}-seed{seed}", seed, args.steps, args.eval_every, root, args.threads,
                       args.quick, QUICK if args.quick else ())
    s, rows = run["summary"], run["rows"]
    margins = [{"step": r["step"], "weighted": r[PREFIX + "rewards/margins"],
                "unweighted": r[PREFIX + "rewards_unweighted/margins"]} for r in rows if PREFIX + "rewards/margins" in r]
    return {"method": method, "seed": seed, "curve": run["curve"], "margins": margins, "rl_seconds": s["rl_seconds"],
            "accuracy_before": s["sampled_accuracy_before"], "accuracy_after": s["sampled_accuracy_after"],
            "greedy_before": s["greedy_accuracy_before"], "greedy_after": s["greedy_accuracy_after"],
            "pairs": s["preference"]["pairs"], "sample_accuracy": s["preference"]["sample_accuracy"],
            "rejected_critical_frac": s["preference"].get("rejected_critical_frac"),
            "final": {k: last_of(rows, PREFIX + k) for k in KEYS}, "mean": {k: mean_of(rows, PREFIX + k) for k in KEYS}}


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for k in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after", "rl_seconds", "pairs",
                  "rejected_critical_frac"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.fmean(vals) if vals else None
        row["final"] = {k: statistics.fmean(v) if (v := [r["final"][k] for r in rs if r["final"][k] is not None])
                        else None for k in KEYS}
        out.append(row)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_mean_curves(axes[0], runs, METHODS, "DPO step", "tiny model")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, method in zip(colours, METHODS, strict=False):  # the same colour per method in both panels
        rs = [r for r in runs if r["method"] == method and r["margins"]]
        if rs:
            n = min(len(r["margins"]) for r in rs)
            steps = [rs[0]["margins"][i]["step"] for i in range(n)]
            for key, style in (("unweighted", "-"), ("weighted", ":")):
                if key == "weighted" and method != "cdpo":
                    continue  # identical to the unweighted margin without token weights
                vals = [statistics.fmean(r["margins"][i][key] for r in rs) for i in range(n)]
                axes[1].plot(steps, vals, style, color=colour, label=f"{method} ({key})")
    axes[1].set_xlabel("DPO step")
    axes[1].set_ylabel("implicit reward margin β·(Λ_w − Λ_l)")
    axes[1].set_title("reward margins (solid: unweighted; dotted: as trained)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Token-level DPO on sampled pairs: DPO vs TDPO2 vs cDPO vs T-REG")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = run_arguments(__doc__, list(METHODS))
    ap.set_defaults(steps=100, eval_every=25)
    args = ap.parse_args(argv)
    runs = run_jobs(args, lambda m, seed, root: run_one(m, seed, args, root), "preference runs")
    report = {"benchmark": "compare_dpo", "quick": args.quick, "environment": environment(args.threads),
              "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "runs": runs,
              "summary": summarise(runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_dpo_cpu.json").write_text(json.dumps(report, indent=2))
    plot(runs, out / "compare_dpo_cpu.png")
    from benchmarks.report import dpo_table

    print(dpo_table(report))
    print(f"wrote {out / 'compare_dpo_cpu.json'} and {out / 'compare_dpo_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
