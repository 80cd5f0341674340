"""Our TRL subclass with the grpo objective at keep = 1 trains exactly like TRL 1.16's own GRPOTrainer."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import objectives
from trainer.grpo_adapter import TokenSelectiveGRPOTrainer
from trainer.modeling import build_model
from trainer.rewards import task_reward
from trainer.schema import ModelConfig
from trainer.tasks import build_task


def train(tmp_path, cls, loss_type, **extra):
    model, tok = build_model(ModelConfig(), seed=0)
    task = build_task({"name": "arithmetic", "train_size": 32, "eval_size": 4, "max_digits": 1})
    rows, _ = task.splits(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / cls.__name__), max_steps=2, learning_rate=1e-3, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=4, loss_type=loss_type, report_to=[], use_cpu=True, seed=0,
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    trainer = cls(model=model, processing_class=tok, reward_funcs=[task_reward(task)], args=args,
                  train_dataset=Dataset.from_list(rows), **extra)
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_same_updates_as_trl(tmp_path, loss_type):
    ref = train(tmp_path, GRPOTrainer, loss_type)
    ours = train(tmp_path, TokenSelectiveGRPOTrainer, loss_type,
                 objective=objectives.build("grpo", loss_type=loss_type, max_completion_length=4))
    ref_logs = [h for h in ref.state.log_history if "reward" in h]
    our_logs = [h for h in ours.state.log_history if "reward" in h]
    assert [h["reward"] for h in our_logs] == [h["reward"] for h in ref_logs]
    for a, b in zip(ours.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.kernel_stats  # the statistics came from kernels.token_stats, not TRL's fused head
    assert any("objective/grpo/kept_token_frac" in h for h in ours.state.log_history)
