"""The benchmark pipeline runs and writes its JSON schema and plot (timings are never asserted)."""

import json

from benchmarks.token_stats import main


def test_token_stats_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "token_stats_cpu.json").read_text())
    assert (tmp_path / "token_stats_cpu.png").stat().st_size > 0
    assert {"environment", "results", "targets"} <= set(report) and report["quick"] is True
    variants = {(r["level"], r["variant"]) for r in report["results"]}
    assert {("logits", "ours"), ("logits", "ours_eager"), ("logits", "naive"), ("logits", "trl"),
            ("logits", "floor_read"), ("hidden", "trl_tile4096"), ("distill", "ours"), ("distill", "trl")} <= variants
    assert any(r["mode"] == "fwd+bwd_frozen" for r in report["results"])
    for r in report["results"]:
        assert r["median_ms"] > 0 and "peak_extra_mb" in r
    ours = [r for r in report["results"] if r["variant"] == "ours" and r["mode"] == "fwd"]
    assert all(r["max_abs_err"]["logp"] < 1e-4 for r in ours)
    assert all({"name", "bar", "measured", "pass"} <= set(t) for t in report["targets"])


def test_grpo_step_quick(tmp_path):
    from benchmarks.grpo_step import main as step_main

    assert step_main(["--quick", "--out", str(tmp_path), "--reps", "1"]) == 0
    report = json.loads((tmp_path / "grpo_step_cpu.json").read_text())
    assert (tmp_path / "grpo_step_cpu.png").stat().st_size > 0
    assert {(r["variant"], r["keep"]) for r in report["results"]} == {(v, k) for v in ("tokensel", "trl")
                                                                      for k in (0.2, 1.0)}
    ours = [r for r in report["results"] if r["variant"] == "tokensel"]
    assert all(r["kernel_stats"] and r["median_ms"] > 0 and "time_vs_trl" in r for r in ours)


def test_compare_grpo_family_quick(tmp_path):
    from benchmarks.compare_grpo_family import main as family_main

    assert family_main(["--quick", "--seeds", "0", "--methods", "grpo", "d3s", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare_grpo_family_cpu.json").read_text())
    assert (tmp_path / "compare_grpo_family_cpu.png").stat().st_size > 0
    assert [r["method"] for r in report["runs"]] == ["grpo", "d3s"]
    for r in report["runs"]:
        assert [p["step"] for p in r["curve"]] == [0, 1, 2]  # before, the periodic evaluation, after
        assert r["rl_seconds"] >= 0 and 0 < r["trained_fraction"] <= 1
    grpo, d3s = report["summary"]
    assert grpo["trained_fraction"] == 1.0 and d3s["trained_fraction"] < 1.0 and "time_vs_baseline" in d3s
    from benchmarks.report import grpo_family_table

    assert grpo_family_table(report).count("\n| `") == 2


def test_compare_gating_quick(tmp_path):
    from benchmarks.compare_gating import main as gating_main

    assert gating_main(["--quick", "--seeds", "0", "--methods", "gspo", "fiberpo_domain", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare_gating_cpu.json").read_text())
    assert (tmp_path / "compare_gating_cpu.png").stat().st_size > 0
    gspo, fiber = report["runs"]
    assert "clip_frac" in gspo["gates"] and "regime/G1_frac" in fiber["gates"]
    assert "level/domain/pos_zeroed_frac" in fiber["gates"] and [p["step"] for p in fiber["curve"]] == [0, 1, 2]


def test_compare_opd_quick(tmp_path):
    from benchmarks.compare_opd import main as opd_main

    assert opd_main(["--quick", "--seeds", "0", "--methods", "trl_distill", "soft_or_20_pool", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare_opd_cpu.json").read_text())
    assert (tmp_path / "compare_opd_cpu.png").stat().st_size > 0
    trl, soft = report["summary"]
    assert trl["kept_token_frac"] == 1.0 and 0 < soft["kept_token_frac"] < 1
    assert trl["step_time_vs_trl"] == 1.0 and soft["peak_rss_mb"] > 0 and soft["teacher_accuracy"] is not None
    head = report["head"]
    assert {(r["impl"], r["keep"]) for r in head} >= {("tokensel", 0.2), ("trl", 1.0), ("naive", 0.5), ("scoring", 1.0)}
    assert all(r["median_ms"] > 0 and "peak_extra_mb" in r for r in head)


def test_compare_dpo_quick(tmp_path):
    from benchmarks.compare_dpo import main as dpo_main

    assert dpo_main(["--quick", "--seeds", "0", "--methods", "dpo", "cdpo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare_dpo_cpu.json").read_text())
    assert (tmp_path / "compare_dpo_cpu.png").stat().st_size > 0
    dpo, cdpo = report["summary"]
    assert dpo["pairs"] == cdpo["pairs"] > 0 and cdpo["rejected_critical_frac"] is not None
    assert dpo["final"]["rewards_unweighted/margins"] is not None and [p["step"] for p in report["runs"][0]["curve"]] == [0, 1, 2]
