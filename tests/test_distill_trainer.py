"""TipDistillationTrainer at the trainer level (``specs/tip_opd.md`` §8.4, §6): fixed completions replace
generation, one optimizer step with SGD (so parameters differ exactly by the gradient), fp32."""

import pytest
import torch
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer

import objectives
from trainer.distill import TipDistillationTrainer
from trainer.modeling import build_tiny
from trainer.schema import ModelConfig, TinyModelConfig
from trainer.teacher import check_same_vocabulary
from trainer.tokenizer import build_char_tokenizer

PROMPTS = ["12+7=", "3+45=", "60+9=", "8+8=", "21+21=", "5+77=", "9+0=", "33+4="]
ANSWERS = ["19", "48", "69", "16", "42", "82", "9", "37"]


def models(dtype=torch.float32):
    student, tok = build_tiny(ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                                               num_heads=2)), seed=0)
    teacher, _ = build_tiny(ModelConfig(tiny=TinyModelConfig(hidden_size=48, intermediate_size=96, num_layers=2,
                                                             num_heads=2)), seed=1)
    return student.to(dtype), teacher.to(dtype), tok


def fixed_generate(tok, answers):
    """Deterministic completions (answer + eos) in place of sampling, so two trainers see identical rollouts."""
    table = dict(zip(PROMPTS, answers, strict=True))

    def generate(prompts):
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids = [tok(table[p], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in prompts]
        return prompt_ids, completion_ids, None, None, []

    return generate


def run_step(tmp_path, cls, per_device=4, ga=1, answers=ANSWERS, weight_decay=0.0, optim="sgd", steps=1,
             dtype=torch.float32, **kw):
    student, teacher, tok = models(dtype)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), max_steps=steps, learning_rate=0.5, optim=optim, lr_scheduler_type="constant",
        per_device_train_batch_size=per_device, gradient_accumulation_steps=ga, max_completion_length=4,
        beta=1.0, disable_dropout=True, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
        weight_decay=weight_decay, max_grad_norm=0.0, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = cls(model=student, teacher_model=teacher, args=args, processing_class=tok,
                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]), **kw)
    trainer._generate = fixed_generate(tok, answers)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, before, after, losses


def tip(**cfg):
    return {"objective": objectives.build("tip", **cfg)}


def assert_same_update(a, b, tol=1e-6):
    (_, before_a, after_a, loss_a), (_, _, after_b, loss_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-7)
    moved = max((after_a[n] - before_a[n]).abs().max().item() for n in after_a)
    assert moved > 1e-4  # the step did something
    for n in after_a:
        torch.testing.assert_close(after_a[n], after_b[n], rtol=0, atol=tol, msg=n)


@pytest.mark.parametrize("per_device, ga", [(4, 1), (2, 2)])
def test_rule_all_equals_trl_distillation_trainer(tmp_path, per_device, ga):
    ours = run_step(tmp_path / "ours", TipDistillationTrainer, per_device, ga, **tip(rule="all"))
    theirs = run_step(tmp_path / "trl", DistillationTrainer, per_device, ga)
    assert_same_update(ours, theirs)


def test_tokensel_head_and_teacher_cache_equal_trl_head_on_a_selection(tmp_path):
    cached = run_step(tmp_path / "a", TipDistillationTrainer, **tip(rule="soft_or", keep=0.5))
    recompute = run_step(tmp_path / "b", TipDistillationTrainer, **tip(rule="soft_or", keep=0.5,
                                                                        teacher_cache="recompute"))
    trl_head = run_step(tmp_path / "c", TipDistillationTrainer, head="trl",
                        **tip(rule="soft_or", keep=0.5, teacher_cache="recompute"))
    assert_same_update(cached, recompute)
    assert_same_update(cached, trl_head)
    log = next(h for h in cached[0].state.log_history if "objective/tip/kept_token_frac" in h)
    assert 0 < log["objective/tip/kept_token_frac"] < 1


@pytest.mark.parametrize("rule", ["soft_or", "entropy_sample", "q3_only"])
def test_micro_batch_split_does_not_change_the_step(tmp_path, rule):
    # fp64: an untrained student's entropies differ in the 4th digit, and fp32 padding noise would reorder them
    cfg = {"rule": rule, "keep": 0.5}
    one = run_step(tmp_path / "1", TipDistillationTrainer, 4, 1, dtype=torch.float64, **tip(**cfg))
    for per_device, ga in ((2, 2), (1, 4)):
        other = run_step(tmp_path / f"{ga}", TipDistillationTrainer, per_device, ga, dtype=torch.float64, **tip(**cfg))
        assert_same_update(one, other, tol=1e-12)


def test_a_step_with_no_kept_token_is_skipped(tmp_path):
    # 1-digit answers + eos = 2 valid tokens: floor(0.4 * 2) = 0 kept in every rollout
    short = [a[-1] for a in ANSWERS]
    trainer, before, after, losses = run_step(tmp_path, TipDistillationTrainer, answers=short, weight_decay=0.1,
                                              optim="adamw_torch", **tip(rule="soft_or", keep=0.4))
    log = next(h for h in trainer.state.log_history if "objective/tip/skipped_step" in h)
    assert log["objective/tip/skipped_step"] == 1.0 and log["objective/tip/kept_token_frac"] == 0.0
    assert losses == [0.0]
    for n in before:  # AdamW with weight decay would have moved every weight
        assert torch.equal(before[n], after[n]), n
    assert not trainer.optimizer.optimizer.state  # the optimizer never stepped
    assert trainer.state.global_step == 1
    # the next, non-empty step trains normally
    trainer2, before2, after2, _ = run_step(tmp_path / "b", TipDistillationTrainer, weight_decay=0.1,
                                            optim="adamw_torch", **tip(rule="soft_or", keep=0.4))
    assert any(not torch.equal(before2[n], after2[n]) for n in before2)


def test_configuration_errors_name_the_cause(tmp_path):
    student, teacher, tok = models()
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_completion_length=4)
    with pytest.raises(ValueError, match="beta must be 1.0"):
        TipDistillationTrainer(model=student, teacher_model=teacher, processing_class=tok,
                               args=DistillationConfig(**base, beta=0.5), **tip())
    with pytest.raises(ValueError, match="disable_dropout"):
        TipDistillationTrainer(model=student, teacher_model=teacher, processing_class=tok,
                               args=DistillationConfig(**base, beta=1.0, disable_dropout=False), **tip())
    with pytest.raises(ValueError, match="kept_rows needs head=tokensel"):
        TipDistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, head="trl",
                               args=DistillationConfig(**base, beta=1.0, disable_dropout=True), **tip())


def test_different_tokenizers_fail_before_training():
    _, _, tok = models()
    other = build_char_tokenizer("0123456789+-=")
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocabulary(tok, other)
    check_same_vocabulary(tok, build_char_tokenizer())


def test_micro_batch_scope_is_exact_with_one_micro_batch_and_flagged(tmp_path):
    cfg = {"rule": "soft_or", "keep": 0.5}
    exact = run_step(tmp_path / "g", TipDistillationTrainer, 4, 1, dtype=torch.float64, **tip(**cfg))
    micro = run_step(tmp_path / "m", TipDistillationTrainer, 4, 1, dtype=torch.float64,
                     **tip(**cfg, norm_scope="micro_batch"))
    assert_same_update(exact, micro, tol=1e-12)  # one micro-batch on one rank is the whole step
    log = next(h for h in micro[0].state.log_history if "objective/tip/norm_scope_exact" in h)
    assert log["objective/tip/norm_scope_exact"] == 0.0 and 0 < log["objective/tip/kept_token_frac"] < 1
    split = run_step(tmp_path / "s", TipDistillationTrainer, 2, 2, dtype=torch.float64,
                     **tip(**cfg, norm_scope="micro_batch"))
    assert split[3][0] > 0  # runs; the selection is per micro-batch (an approximation, not compared)
