"""The benchmark pipeline runs and writes its JSON schema and plot (timings are never asserted)."""

import json

from benchmarks.token_stats import main


def test_token_stats_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "token_stats_cpu.json").read_text())
    assert (tmp_path / "token_stats_cpu.png").stat().st_size > 0
    assert {"environment", "results", "targets"} <= set(report) and report["quick"] is True
    variants = {(r["level"], r["variant"]) for r in report["results"]}
    assert {("logits", "ours"), ("logits", "naive"), ("logits", "trl"), ("hidden", "trl_tile4096")} <= variants
    for r in report["results"]:
        assert r["median_ms"] > 0 and "peak_extra_mb" in r
    ours = [r for r in report["results"] if r["variant"] == "ours" and r["mode"] == "fwd"]
    assert all(r["max_abs_err"]["logp"] < 1e-4 for r in ours)
    assert all({"name", "bar", "measured", "pass"} <= set(t) for t in report["targets"])
