"""Configuration: every experiment composes; bad keys, types and combinations fail before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest

import objectives
from trainer.config import CONFIG_DIR, ConfigError, compose, experiments

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    r = compose([f"+experiment={name}"])
    assert r.cfg.experiment == name
    assert r.cfg.description, "every experiment says in one line what it shows"
    assert r.objective.name in objectives.names()
    if hasattr(r.objective.config, "max_completion_length"):  # trainer facts are filled in where an objective uses them
        assert r.objective.config.max_completion_length == r.cfg.trainer.max_completion_length


def test_trainer_facts_fill_objective_configs_and_bad_values_fail():
    r = compose(["+experiment=d3s", "trainer.num_generations=16"])
    assert (r.objective.config.n_init, r.objective.config.n_final) == (4, 8)
    with pytest.raises(ConfigError, match="objective.n_init"):
        compose(["+experiment=d3s", "objective.n_init=x"])
    with pytest.raises(ConfigError, match="reward.name"):
        compose(["+experiment=ttrl", "reward.name=oracle"])
    with pytest.raises(ConfigError, match="selection_pass"):
        compose(["+experiment=d3s", "trainer.selection_pass=never"])
    with pytest.raises(ConfigError, match="did you mean objective.lambda_lo"):
        compose(["+experiment=spine", "objective.lambda_low=0.1"])


def test_experiment_list_has_descriptions():
    assert set(experiments()) == set(EXPERIMENTS)


def test_overrides_reach_components():
    r = compose(["+experiment=quickstart", "objective.keep=0.5", "objective.scope=global_batch", "seed=3",
                 "task.max_digits=2", "trainer.max_steps=7"])
    assert r.objective.config.keep == 0.5 and r.objective.config.scope == "global_batch"
    assert r.cfg.seed == 3 and r.cfg.trainer.max_steps == 7 and r.task_config.max_digits == 2
    if hasattr(r.objective.config, "max_completion_length"):  # trainer facts are filled in where an objective uses them
        assert r.objective.config.max_completion_length == r.cfg.trainer.max_completion_length


def test_group_override():
    r = compose(["+experiment=countdown", "objective=grpo", "task=arithmetic"])
    assert r.objective.config.keep == 1.0 and r.task_config.name == "arithmetic"


def test_task_keys_must_fit_the_chosen_task():
    with pytest.raises(ConfigError, match="task.max_digits: unknown key for task 'countdown'"):
        compose(["+experiment=quickstart", "task=countdown", "task.max_digits=2"])


def problems(*args):
    with pytest.raises(ConfigError) as e:
        compose(["+experiment=quickstart", *args])
    return e.value.problems


def test_wrong_type_names_key_and_reason():
    (p,) = problems("seed=abc")
    assert p.startswith("seed:") and "'abc'" in p and "Integer" in p


def test_unknown_objective_key_suggests_closest():
    (p,) = problems("objective.kepp=0.2")
    assert p.startswith("objective.kepp:") and "unknown key" in p and "objective.keep" in p


def test_unknown_nested_key_suggests_closest():
    (p,) = problems("trainer.max_step=3")
    assert "trainer.max_step: unknown key" in p and "trainer.max_steps" in p


def test_unknown_top_level_key():
    (p,) = problems("sed=1")
    assert p.startswith("sed: unknown key") and "seed" in p


def test_all_errors_reported_at_once():
    ps = problems("seed=abc", "objective.kepp=0.2", "task.max_digitz=2", "trainer.num_generations=1")
    assert len(ps) == 4
    assert any("task.max_digitz" in p and "task.max_digits" in p for p in ps)
    assert any("num_generations" in p and "at least 2" in p for p in ps)


def test_objective_value_checks():
    (p,) = problems("objective.keep=1.5")
    assert p.startswith("objective:") and "keep" in p
    (p,) = problems("objective.keep=abc")
    assert p.startswith("objective.keep:") and "'abc'" in p


def test_impossible_combinations():
    (p,) = problems("trainer.prompts_per_step=3", "trainer.num_generations=3", "trainer.gradient_accumulation_steps=2")
    assert p.startswith("trainer.prompts_per_step") and "gradient_accumulation_steps" in p
    (p,) = problems("objective.scope=global_batch", "trainer.selection_pass=never")
    assert p.startswith("trainer.selection_pass")
    with pytest.raises(ConfigError, match="deepspeed.enabled: DeepSpeed runs the RL"):
        compose(["+experiment=opd_all", "deepspeed=zero2"])
    compose(["+experiment=tdpo2", "deepspeed=zero3"])  # token-level DPO runs under ZeRO
    with pytest.raises(ConfigError, match="trainer.sampler: hashed is implemented for the RL"):
        compose(["+experiment=dpo", "trainer.sampler=hashed"])
    (p,) = problems("model.attn_implementation=flash_attention_2")  # no flash-attn, no GPU on this machine
    assert p.startswith("model.attn_implementation: flash_attention_2") and ("flash_attn" in p or "CUDA" in p)
    (p,) = problems("model.attn_implementation=spda")
    assert "did you mean sdpa" in p
    found = problems("trainer.use_vllm=true", "trainer.sampler=hashed")
    assert any(p.startswith("trainer.use_vllm") for p in found) and any("cannot drive vLLM" in p for p in found)
    (p,) = problems("trainer.optim=adamw_troch")
    assert p.startswith("trainer.optim") and "did you mean adamw_torch" in p
    (p,) = problems("trainer.save_total_limit=1")
    assert p.startswith("trainer.save_total_limit") and "none complete" in p


def test_unknown_experiment_and_group_option():
    with pytest.raises(ConfigError, match="Available: .*quickstart"):
        compose(["+experiment=quickstrat"])
    with pytest.raises(ConfigError, match="Options: .*grpo_forking"):
        compose(["+experiment=quickstart", "objective=grpo_forkin"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_exit_nonzero_before_model_loads():
    p = run_cli("+experiment=quickstart", "seed=abc", "objective.kepp=0.2")
    assert p.returncode == 2
    assert "seed:" in p.stderr and "objective.keep" in p.stderr
    assert "warm-up" not in p.stdout and "[tokensel]" not in p.stdout  # nothing was built


def test_cli_without_experiment_lists_them():
    p = run_cli()
    assert p.returncode == 2
    for name in EXPERIMENTS:
        assert name in p.stdout


def test_cli_accepts_deepspeed_local_rank():
    p = run_cli("--local_rank=0", "+experiment=quickstart", "--cfg")
    assert p.returncode == 0, p.stderr
    assert "experiment: quickstart" in p.stdout


def test_scale_keys_reach_the_trl_configs(tmp_path):
    from trainer.run import dpo_args, grpo_args

    r = compose(["+experiment=quickstart", "trainer.ds3_gather_for_generation=false", "trainer.optim=sgd",
                 "trainer.vllm_gpu_memory_utilization=0.5", "trainer.save_total_limit=3"])
    a = grpo_args(r.cfg, r.objective, tmp_path)
    assert (a.ds3_gather_for_generation, a.optim, a.vllm_gpu_memory_utilization, a.save_total_limit) == (
        False, "sgd", 0.5, 3)
    d = compose(["+experiment=dpo", "trainer.optim=sgd"])
    assert dpo_args(d.cfg, d.objective, tmp_path).optim == "sgd"
