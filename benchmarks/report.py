"""Markdown tables from the benchmark JSONs, for docs/performance.md (so no figure is transcribed by hand).

    python -m benchmarks.report [--dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def token_stats_tables(report: dict) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape_name"] for r in report["results"]):
        rows = [r for r in report["results"] if r["shape_name"] == shape]
        r0 = rows[0]
        lines += [f"\n### {shape}: N = {r0['N']}, V = {r0['V']}, d = {r0['d']} (fp32)\n",
                  "| level | mode | variant | median ms | extra MB | time / naive | memory / naive |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            mode = r["mode"] + (f" {r['keep']}" if r["mode"] == "selective" else "") + (
                f" {r['divergence']}" if "divergence" in r else "")
            name = f"**{r['variant']}**" if r["variant"] == "ours" else r["variant"]
            if r.get("status") == "oom":
                lines.append(f"| {r['level']} | {mode} | {name} | oom | oom | — | — |")
                continue
            lines.append(f"| {r['level']} | {mode} | {name} | {r['median_ms']:.0f} | {r['peak_extra_mb']:.1f} | "
                         f"{_f(r.get('time_vs_naive'))} | {_f(r.get('memory_vs_naive'), 3)} |")
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| bar | limit | measured | verdict |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['name']} | {t['bar']} | {t['measured']:.3f} | {'met' if t['pass'] else '**not met**'} |")
    return "\n".join(lines)


def grpo_step_table(report: dict) -> str:
    lines = ["| variant | keep | median ms | peak extra MB | time / TRL | memory / TRL |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['variant']} | {r['keep']} | {r['median_ms']:.0f} | {r['peak_extra_mb']:.0f} | "
                     f"{_f(r.get('time_vs_trl'))} | {_f(r.get('memory_vs_trl'))} |")
    return "\n".join(lines)


def grpo_family_table(report: dict) -> str:
    seeds = report["seeds"]
    head = " | ".join(f"sampled, seed {s}" for s in seeds)
    lines = [f"| method | {head} | tokens trained | RL s (mean) | time vs baseline |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for row in report["summary"]:
        runs = {r["seed"]: r for r in report["runs"] if r["method"] == row["method"]}
        cells = " | ".join(f"{100 * runs[s]['accuracy_before']:.1f} → {100 * runs[s]['accuracy_after']:.1f}"
                           if s in runs else "–" for s in seeds)
        lines.append(f"| `{row['method']}` | {cells} | {100 * (row['trained_fraction'] or 0):.1f} % | "
                     f"{row['rl_seconds']:.0f} | {_f(row.get('time_vs_baseline'))} |")
    return "\n".join(lines)


def gating_table(report: dict) -> str:
    lines = ["| method | sampled before → after | greedy after | RL s | token gate | G1 / rollback / zeroed (pos) |",
             "|---|---|---|---|---|---|"]
    for s in report["summary"]:
        g = s["gates"]
        token = g.get("clip_frac", g.get("fiber_num_clip_frac"))
        regimes = (f"{100 * g['regime/G1_frac']:.1f} / {100 * g['base/pos_rollback_frac']:.1f} / "
                   f"{100 * g['base/pos_zeroed_frac']:.1f} %" if "regime/G1_frac" in g else "–")
        lines.append(f"| `{s['method']}` | {100 * s['accuracy_before']:.1f} → {100 * s['accuracy_after']:.1f} | "
                     f"{100 * s['greedy_after']:.1f} | {s['rl_seconds']:.0f} | {100 * token:.2f} % | {regimes} |")
    return "\n".join(lines)


def opd_tables(report: dict) -> str:
    lines = ["| method | sampled before → after | greedy after | tokens trained | Q3 share of kept | step s | "
             "step / TRL | RL s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        q3 = "–" if s["method"] in ("trl_distill", "opd_all") else f"{100 * (s['q3_share_kept'] or 0):.1f} %"
        lines.append(f"| `{s['method']}` | {100 * s['accuracy_before']:.1f} → {100 * s['accuracy_after']:.1f} | "
                     f"{100 * s['greedy_after']:.1f} | {100 * (s['kept_token_frac'] or 0):.1f} % | {q3} | "
                     f"{_f(s['step_time_s'], 3)} | {_f(s['step_time_vs_trl'])} | {s['rl_seconds']:.0f} | "
                     f"{s['peak_rss_mb']:.0f} |")
    teacher = [s["teacher_accuracy"] for s in report["summary"] if s["teacher_accuracy"] is not None]
    if teacher:
        lines.append(f"\nTeacher held-out sampled accuracy: {100 * sum(teacher) / len(teacher):.1f} %.")
    h = report["head"][0]
    lines += [f"\nLoss-pass LM head, N = {h['N']}, d = {h['d']}, V = {h['V']} (fp32, forward + backward):\n",
              "| implementation | keep | median ms | peak extra MB | time / keep 1.0 | time / TRL | model GFLOP | GFLOP/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["head"]:
        lines.append(f"| {r['impl']} | {r['keep']} | {r['median_ms']:.0f} | {r['peak_extra_mb']:.1f} | "
                     f"{_f(r['time_vs_keep1'])} | {_f(r['time_vs_trl'])} | {r['model_gflop']:.1f} | "
                     f"{r['gflops_per_s']:.1f} |")
    return "\n".join(lines)


def dpo_table(report: dict) -> str:
    lines = ["| method | sampled before → after | greedy before → after | margin (unweighted) | margin (as trained) | "
             "reward acc. | KL margin | critical rejected tokens | RL s |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        f = s["final"]
        crit = "–" if s["rejected_critical_frac"] is None else f"{100 * s['rejected_critical_frac']:.0f} %"
        lines.append(f"| `{s['method']}` | {100 * s['accuracy_before']:.1f} → {100 * s['accuracy_after']:.1f} | "
                     f"{100 * s['greedy_before']:.1f} → {100 * s['greedy_after']:.1f} | "
                     f"{_f(f['rewards_unweighted/margins'], 3)} | {_f(f['rewards/margins'], 3)} | "
                     f"{_f(f['rewards/accuracies'])} | {_f(f['kl/margin'], 3)} | {crit} | {s['rl_seconds']:.0f} |")
    pairs = [s["pairs"] for s in report["summary"]]
    lines.append(f"\nPairs per seed (mean): {sum(pairs) / len(pairs):.0f}. Margins and reward accuracy: the last "
                 "logged step, mean over seeds.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    for name, render in (("token_stats_cpu.json", lambda r: token_stats_tables(r) + "\n\n" + targets_table(r)),
                         ("grpo_step_cpu.json", lambda r: grpo_step_table(r) + "\n\n" + targets_table(r)),
                         ("compare_grpo_family_cpu.json", grpo_family_table),
                         ("compare_gating_cpu.json", gating_table),
                         ("compare_opd_cpu.json", opd_tables),
                         ("compare_dpo_cpu.json", dpo_table)):
        path = d / name
        if path.exists():
            print(f"<!-- {path} -->")
            print(render(json.loads(path.read_text())) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
