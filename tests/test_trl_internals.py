"""The TRL 1.16 internals the adapter relies on (trainer/grpo_adapter.py). A TRL upgrade that moves them fails here."""

import inspect

import torch
import trl
from trl import GRPOTrainer
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict


def test_trl_series():
    assert trl.__version__.startswith("1.16."), trl.__version__


def test_methods_we_override_or_call():
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert list(params)[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "compute_entropy" in params
    assert GRPOTrainer.loss_is_scaled_for_ga is True  # our loss is returned already scaled


def test_generation_batch_keys_we_read():
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch",
                "old_per_token_logps", "ref_per_token_logps"):
        assert f'"{key}"' in src, key


def test_scalars_survive_shuffle_and_split():
    batch = {"x": torch.arange(8).reshape(4, 2), "n": torch.tensor(7.0), "ids": torch.arange(4)}
    shuffled = shuffle_sequence_dict(batch)
    assert shuffled["n"].item() == 7.0
    assert torch.equal(shuffled["x"][:, 0] // 2, shuffled["ids"])  # rows move together
    for part in split_tensor_dict(shuffled, 2):
        assert part["n"].item() == 7.0 and part["x"].shape[0] == 2


def test_distillation_internals_we_rely_on():
    from trl import DistillationTrainer

    sig = inspect.signature(DistillationTrainer._compute_loss).parameters
    assert list(sig) == ["self", "unwrapped_student", "inputs", "num_items_in_batch"]
    assert list(inspect.signature(DistillationTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    assert list(inspect.signature(DistillationTrainer._get_last_hidden_state).parameters)[:5] == [
        "self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"]
    src = inspect.getsource(DistillationTrainer._compute_loss)
    assert 'completion_mask * inputs["tool_mask"]' in src  # TIP's selection is folded into tool_mask
    assert 'inputs["num_items_in_batch"]' in inspect.getsource(DistillationTrainer.compute_loss)
    gen = inspect.getsource(DistillationTrainer._generate_and_score_completions)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"):
        assert f'"{key}"' in gen, key
