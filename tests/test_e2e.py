"""End-to-end: the real entry point on the tiny model, a few steps (seconds), plus the quickstart itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.__main__ import main
from trainer.tracking import read_wandb_history

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "warmup.steps=30", "trainer.max_steps=3", "trainer.prompts_per_step=4", "trainer.num_generations=4",
    "trainer.logging_steps=1", "task.train_size=64", "task.eval_size=16", "eval.batch_size=16",
]

pytestmark = pytest.mark.e2e


def run_small(tmp_path, *extra, experiment="quickstart"):
    assert main([f"+experiment={experiment}", f"run.root={tmp_path}", *SMALL, *extra]) == 0
    run_dir = tmp_path / (experiment if "run.name=" not in " ".join(extra) else extra[-1].split("=")[1])
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_quickstart_small_writes_summary_metrics_wandb_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir, summary = run_small(tmp_path, "tracking.wandb=auto")
    for key in ("accuracy_before", "accuracy_after", "kept_token_fraction", "wall_seconds"):
        assert summary[key] is not None, key
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 < summary["kept_token_fraction"] < 1.0
    assert summary["rl_steps"] == 3
    assert summary["kernels_backend"] == "torch"

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("objective/grpo/kept_token_frac" in m for m in metrics)
    assert any("train/reward" in m for m in metrics)
    # selective backward: the head recomputes only the kept tokens' rows (keep 0.2 per completion)
    kept = [m["objective/grpo/kept_token_frac"] for m in metrics if "objective/grpo/kept_token_frac" in m]
    bwd = [m["kernels/backward_row_fraction"] for m in metrics if "kernels/backward_row_fraction" in m]
    assert len(bwd) == len(kept) == 3
    for b, k in zip(bwd, kept, strict=True):
        assert 0 <= b <= k + 1e-9  # kept tokens whose advantage is 0 have zero upstream gradient: skipped too
    assert max(bwd) > 0
    rows = [(m["kernels/rows_backward"], m["kernels/rows_valid"]) for m in metrics if "kernels/rows_valid" in m]
    assert len(rows) == 3 and all(0 <= r <= v and v > 0 for r, v in rows)

    # W&B ran offline (no API key) and its run file reads back with the objective's metrics.
    assert summary["wandb"]["mode"] == "offline"
    run_id = (run_dir / "wandb_run_id").read_text()
    assert summary["wandb"]["id"] == run_id
    (wandb_file,) = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    history = read_wandb_history(wandb_file)
    assert any(k.startswith("objective/grpo/") for row in history for k in row)
    kept = [row["objective/grpo/kept_token_frac"] for row in history if "objective/grpo/kept_token_frac" in row]
    assert len(kept) == 3 and all(0 < k < 1 for k in kept)

    # The checkpoint reloads with the stock Auto classes.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    with torch.no_grad():
        assert model(**tok("1+2=", return_tensors="pt")).logits.isfinite().all()

    # The second run reuses the cached warm-up, and keeps the W&B run id of the run directory.
    _, again = run_small(tmp_path, "tracking.wandb=offline")
    assert again["warmup"]["cached"] is True and summary["warmup"]["cached"] is False
    assert again["accuracy_before"] == summary["accuracy_before"]
    assert again["wandb"]["id"] == run_id


@pytest.mark.parametrize("scope", ["global_batch", "per_group"])
def test_step_level_selection_pass(tmp_path, scope):
    _, summary = run_small(tmp_path, f"objective.scope={scope}", "tracking.wandb=disabled")
    assert 0.0 < summary["kept_token_fraction"] < 1.0


@pytest.mark.parametrize(
    "experiment, prefix",
    [("grpo", "objective/grpo/"), ("grpo_top_entropy", "objective/grpo/"), ("spine", "objective/entropy_band/"),
     ("ttrl", "reward/majority_vote/"), ("ttrl_spine", "objective/entropy_band/"), ("d3s", "objective/d3s/"),
     ("d3s_gspo", "objective/d3s/"), ("fiberpo", "objective/fiberpo/"), ("fiberpo_domain", "objective/fiberpo/")],
)
def test_grpo_family_experiments_run_end_to_end(tmp_path, experiment, prefix):
    run_dir, summary = run_small(tmp_path, "tracking.wandb=disabled", experiment=experiment)
    assert summary["rl_steps"] == 3 and summary["accuracy_after"] is not None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for m in metrics for k in m}
    assert any(k.startswith(prefix) or k.startswith("train/" + prefix) for k in keys), sorted(keys)
    if experiment.startswith("ttrl"):
        assert "train/reward/majority_vote/label_share" in keys
    if experiment.startswith("spine") or experiment == "ttrl_spine":
        assert (run_dir / "reference").is_dir()  # the KL anchor: the warm-started weights, written for TRL
        assert "objective/entropy_band/kl" in keys and "objective/entropy_band/band_lo_mean" in keys
    if experiment == "fiberpo_domain":
        assert "objective/fiberpo/level/domain/pos_pass_frac" in keys and "objective/fiberpo/level_context_approx_frac" in keys
        drift = [m["objective/fiberpo/drift_abs_mean"] for m in metrics if "objective/fiberpo/drift_abs_mean" in m]
        assert max(drift) > 0  # num_iterations = 4: the policy moves away from the behaviour policy
    if experiment.startswith("d3s"):
        kept = [m["objective/d3s/kept_sample_frac"] for m in metrics if "objective/d3s/kept_sample_frac" in m]
        assert kept and all(0 < k < 1 for k in kept)
        # dropped rollouts do no work: the statistics rows of the loss pass are only the kept rollouts'
        rows = [m["kernels/rows_valid"] for m in metrics if "kernels/rows_valid" in m]
        assert rows and all(0 < r < 16 * 6 for r in rows)


@pytest.mark.parametrize("experiment", ["opd_all", "tip_soft_or", "tip_entropy_sample", "tip_q3"])
def test_distillation_experiments_run_end_to_end(tmp_path, experiment):
    run_dir, summary = run_small(tmp_path, "tracking.wandb=disabled", "trainer.num_generations=1",
                                 "distill.teacher.warmup_steps=40", "trainer.prompts_per_step=8",
                                 experiment=experiment)
    assert summary["rl_steps"] == 3 and summary["accuracy_after"] is not None
    assert summary["teacher"]["parameters"] > 2 * 870_000 and summary["teacher"]["accuracy"] is not None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [m["objective/tip/kept_token_frac"] for m in metrics if "objective/tip/kept_token_frac" in m]
    assert len(kept) == 3
    # the loss head projects and back-propagates the kept tokens only
    bwd = [m["kernels/backward_row_fraction"] for m in metrics if "kernels/backward_row_fraction" in m]
    assert bwd == pytest.approx(kept, abs=1e-12)
    if experiment == "opd_all":
        assert kept == [1.0, 1.0, 1.0]
    else:
        assert all(0 < k < 1 for k in kept)
        assert any("objective/tip/quadrant/q3" in m for m in metrics)
    if experiment == "tip_q3":
        assert any("objective/tip/fkl_kept" in m for m in metrics)


PREF_SMALL = ["trainer.num_generations=1", "preference.prompts=48", "preference.samples_per_prompt=6",
              "preference.ce_steps=10", "trainer.prompts_per_step=4"]


@pytest.mark.parametrize("experiment", ["dpo", "tdpo2", "cdpo", "treg"])
def test_preference_experiments_run_end_to_end(tmp_path, experiment):
    run_dir, summary = run_small(tmp_path, "tracking.wandb=disabled", *PREF_SMALL, experiment=experiment)
    assert summary["rl_steps"] == 3 and summary["accuracy_after"] is not None
    info = summary["preference"]
    assert info["pairs"] > 0 and info["prompts"] == 48 and not info["cached"] and len(info["tokenizer"]) == 16
    pairs = [json.loads(line) for line in (Path(info["path"]) / "pairs.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for m in metrics for k in m}
    assert "objective/token_dpo/rewards/margins" in keys and "objective/token_dpo/rewards_unweighted/margins" in keys
    if experiment == "cdpo":
        assert all(len(p["rejected_token_weights"]) == len(p["rejected"]) + 1 for p in pairs)  # + EOS (weight 1)
        assert all(p["rejected_token_weights"][-1] == 1.0 for p in pairs)
        assert 0 <= info["rejected_critical_frac"] <= 1
        assert all(0 <= w <= 1 for p in pairs for w in p["rejected_token_weights"])
        assert "objective/token_dpo/implicit_reward/high_weight" in keys
    if experiment == "tdpo2":
        assert "objective/token_dpo/kl/margin" in keys
    if experiment == "treg":
        assert all(-0.5 < r < 0.5 for p in pairs for r in p["chosen_token_rewards"] + p["rejected_token_rewards"])
        assert "objective/token_dpo/treg/weight" in keys


def test_preference_dataset_from_a_local_file_with_weight_columns(tmp_path):
    """A user's preference file (prompt / chosen / rejected + weights) goes through the same trainer; a weight list
    of the wrong length fails naming the row."""
    from trainer.dpo import TokenWeightError

    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1), "weight": 1.0,
             "rejected_token_weights": [0.5] * (len(str(2 * a + 1)) + 1)} for a in range(10, 30)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, summary = run_small(tmp_path, "tracking.wandb=disabled", *PREF_SMALL, f"preference.source={data}",
                           "objective.preset=cdpo", experiment="dpo")
    assert summary["preference"]["source"] == str(data) and summary["rl_steps"] == 3
    rows[3]["rejected_token_weights"] = [0.5]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TokenWeightError, match="row 3: column 'rejected_token_weights' has 1 values"):
        run_small(tmp_path, "tracking.wandb=disabled", *PREF_SMALL, f"preference.source={data}", experiment="dpo")


def test_local_model_dir_and_local_jsonl(tmp_path):
    """Real-use path: model.name_or_path=<dir> and task=file with a local JSONL go through the same code."""
    from trainer.modeling import build_model
    from trainer.schema import ModelConfig

    model, tok = build_model(ModelConfig(), seed=1)
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a + 1}=", "result": 2 * a + 1}) + "\n" for a in range(60)))
    args = [
        "model=hf", f"model.name_or_path={model_dir}", "model.dtype=float32",
        "task=file", f"task.source={data}", "task.prompt_field=question", "task.answer_field=result",
        "task.answer_format=number", "task.eval_size=8", "tracking.wandb=disabled", "run.name=local",
    ]
    run_dir, summary = run_small(tmp_path, *args)
    assert summary["rl_steps"] == 3 and (run_dir / "final" / "config.json").exists()
    assert "task: file" not in (run_dir / "config.yaml").read_text()  # resolved config, not the group name
    assert str(data) in (run_dir / "config.yaml").read_text()


def test_distillation_with_a_local_teacher_dir_and_a_mismatched_one(tmp_path):
    """A real teacher goes through model loading by path; one with another tokenizer fails before training."""
    from trainer.modeling import build_tiny
    from trainer.schema import ModelConfig, TinyModelConfig
    from trainer.tokenizer import build_char_tokenizer

    teacher, tok = build_tiny(ModelConfig(tiny=TinyModelConfig(hidden_size=64, intermediate_size=128)), seed=3)
    good = tmp_path / "teacher"
    teacher.save_pretrained(good)
    tok.save_pretrained(good)
    run_dir, summary = run_small(tmp_path, "tracking.wandb=disabled", "trainer.num_generations=1",
                                 f"distill.teacher.name_or_path={good}", experiment="tip_soft_or")
    assert summary["teacher"]["source"] == str(good) and summary["rl_steps"] == 3

    other_tok = build_char_tokenizer("0123456789+-=")
    other, _ = build_tiny(ModelConfig(), seed=0)
    other.resize_token_embeddings(len(other_tok))
    bad = tmp_path / "bad-teacher"
    other.save_pretrained(bad)
    other_tok.save_pretrained(bad)
    with pytest.raises(ValueError, match="tokenizers differ"):
        run_small(tmp_path, "tracking.wandb=disabled", "trainer.num_generations=1",
                  f"distill.teacher.name_or_path={bad}", experiment="tip_soft_or")


def test_no_cuda_wheels_in_environment():
    """The install must stay CPU-only on a CPU machine (no nvidia-* wheels pulled by an unpinned torch)."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    names = [p["name"].lower() for p in json.loads(out.stdout)]
    assert not [n for n in names if n.startswith("nvidia-")]
    assert "+cpu" in torch.__version__ or torch.cuda.is_available()


@pytest.mark.skipif(os.environ.get("TOKENSEL_SKIP_QUICKSTART") == "1", reason="TOKENSEL_SKIP_QUICKSTART=1")
def test_quickstart_learns(tmp_path):
    """The README's quickstart, unchanged: held-out accuracy rises by >= 10 points from a 10-80 % warm start."""
    env = os.environ | {"TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "trainer", "+experiment=quickstart", f"run.root={tmp_path}",
                        "tracking.wandb=disabled"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "quickstart" / "summary.json").read_text())
    assert 0.10 <= s["accuracy_before"] <= 0.80, s
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.10, s
