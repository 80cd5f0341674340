"""TokenDPOTrainer (``trainer/dpo.py``): equal to TRL 1.16's DPOTrainer with all-ones weights (loss, gradients, one
optimizer step with accumulation), weight columns laid out like the completion tokens, bad columns named."""

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import objectives
from trainer.dpo import TokenDPOTrainer, TokenWeightError
from trainer.modeling import build_tiny
from trainer.schema import ModelConfig, TinyModelConfig

ROWS = [{"prompt": "12+7=", "chosen": "19", "rejected": "18"},
        {"prompt": "3+45=", "chosen": "48", "rejected": "4"},
        {"prompt": "60+9=", "chosen": "69", "rejected": "96"},
        {"prompt": "8+8=", "chosen": "16", "rejected": "15"}]


def models(dtype=torch.float32):
    tiny = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    model, tok = build_tiny(tiny, seed=0)
    ref, _ = build_tiny(tiny, seed=1)
    return model.to(dtype), ref.to(dtype), tok


def make(cls, tmp_path, rows=ROWS, per_device=4, ga=1, preset="dpo", dtype=torch.float32, **extra):
    model, ref, tok = models(dtype)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, max_length=32,
                     per_device_train_batch_size=per_device, gradient_accumulation_steps=ga, max_steps=1,
                     learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                     logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kw = {"objective": objectives.build("token_dpo", preset=preset, beta=0.1, **extra)} if cls is TokenDPOTrainer else {}
    return cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
               **kw)


def test_all_ones_equals_trl_dpo_loss_and_gradients(tmp_path):
    """Our statistics come from the kernels, TRL's from its fused head (fp32 even for fp64 models): round-off only."""
    ours, theirs = make(TokenDPOTrainer, tmp_path / "a"), make(DPOTrainer, tmp_path / "b")
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    for t in (ours, theirs):
        t.model.train()
    l_ours, l_trl = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    assert abs(l_ours.item() - l_trl.item()) <= 1e-5
    g_ours = torch.autograd.grad(l_ours, list(ours.model.parameters()))
    g_trl = torch.autograd.grad(l_trl, list(theirs.model.parameters()))
    for a, b in zip(g_ours, g_trl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # fp32 round-off of two head implementations


def test_fp64_loss_equals_a_logits_reference(tmp_path):
    """The exact math, in fp64: −log σ(β·Δ) with Δ from log_softmax of full logits, written here."""
    ours = make(TokenDPOTrainer, tmp_path, dtype=torch.float64)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    ours.model.train()
    loss = ours.compute_loss(ours.model, batch)

    def seq_logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (lp * batch["completion_mask"][:, 1:]).sum(-1)

    policy = seq_logps(ours.model)
    with torch.no_grad():
        ref = seq_logps(ours.ref_model)
    delta = (policy - ref)[:4] - (policy - ref)[4:]
    expected = -torch.nn.functional.logsigmoid(0.1 * delta).mean()
    assert abs(loss.item() - expected.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(loss, list(ours.model.parameters())),
                    torch.autograd.grad(expected, list(ours.model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_optimizer_step_equals_trl_and_does_not_depend_on_accumulation(tmp_path):
    def step(cls, per_device, ga, dtype, name):
        trainer = make(cls, tmp_path / name, per_device=per_device, ga=ga, dtype=dtype)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        return before, dict(trainer.model.named_parameters())

    before, one = step(TokenDPOTrainer, 4, 1, torch.float64, "a")
    _, two = step(TokenDPOTrainer, 2, 2, torch.float64, "b")
    assert max((one[n] - before[n]).abs().max().item() for n in one) > 1e-3
    for n in one:  # global pair denominator: 1 x 4 == 2 x 2 (fp64)
        torch.testing.assert_close(one[n], two[n], rtol=0, atol=1e-12, msg=n)
    for ga in (1, 2):
        _, ours = step(TokenDPOTrainer, 4 // ga, ga, torch.float32, f"o{ga}")
        _, trl = step(DPOTrainer, 4 // ga, ga, torch.float32, f"t{ga}")
        for n in ours:
            # TRL's fused-head reference log-probs differ from an fp64 computation by up to ~1.6e-3 per sequence here
            # (ours by ~1e-6), so the two updates (lr 0.5) agree to ~1e-4, not to fp32 round-off
            torch.testing.assert_close(ours[n], trl[n], rtol=0, atol=3e-4, msg=n)


def test_weight_columns_reach_the_loss_in_the_completion_layout(tmp_path):
    rows = [r | {"chosen_token_weights": [1.0, 1.0, 1.0], "rejected_token_weights": [0.0] * (len(r["rejected"]) + 1),
                 "weight": 2.0} for r in ROWS]
    trainer = make(TokenDPOTrainer, tmp_path, rows=rows, preset="cdpo")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    shifted = batch["completion_mask"][:, 1:].float()
    B = 4
    assert torch.equal(batch["chosen_token_weights"], shifted[:B] * batch["chosen_token_weights"])  # 0 off-completion
    assert torch.equal(batch["chosen_token_weights"].sum(-1), shifted[:B].sum(-1))  # one weight per token, EOS incl.
    assert batch["rejected_token_weights"].abs().sum() == 0 and batch["pair_weight"].tolist() == [2.0] * 4
    trainer.model.train()
    weighted = trainer.compute_loss(trainer.model, batch).item()
    plain = make(TokenDPOTrainer, tmp_path / "p")
    plain.model.train()
    unweighted = plain.compute_loss(plain.model, plain.data_collator([plain.train_dataset[i] for i in range(4)]))
    # rejected weights 0: h = β·Z_w only; pair weight 2 doubles the loss
    assert abs(weighted - unweighted.item()) > 1e-3


@pytest.mark.parametrize("bad, message", [
    ({"rejected_token_weights": [1.0]}, r"row 0: column 'rejected_token_weights' has 1 values but the tokenized "
                                         r"rejected completion has 3 tokens"),
    ({"chosen_token_weights": [1.0, -1.0, 1.0]}, r"row 0: column 'chosen_token_weights' must hold finite values >= 0"),
    ({"weight": -1.0}, r"row 0: column 'weight' must be a finite number >= 0"),
])
def test_bad_weight_columns_name_the_row_and_column(tmp_path, bad, message):
    rows = [ROWS[0] | bad, *ROWS[1:]]
    rows[1:] = [r | {k: ([1.0] * (len(r[k.split("_")[0]]) + 1) if k != "weight" else 1.0) for k in bad}
                for r in rows[1:]]
    with pytest.raises(TokenWeightError, match=message):
        make(TokenDPOTrainer, tmp_path, rows=rows)


def test_tdpo_and_config_errors(tmp_path):
    trainer = make(TokenDPOTrainer, tmp_path, preset="tdpo2")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and loss.requires_grad
    assert any("kl/margin" in k for k in trainer._metrics["train"])
    model, ref, tok = models()
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, ld_alpha=0.5)
    with pytest.raises(ValueError, match="ld_alpha is not supported"):
        TokenDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                        processing_class=tok, objective=objectives.build("token_dpo"))


def test_pipeline_tokenizes_completions_exactly_like_trl(tmp_path):
    from trainer.preference import trl_completion_ids

    trainer = make(DPOTrainer, tmp_path)
    for i, row in enumerate(ROWS):
        prompt_ids, rejected_ids = trl_completion_ids(trainer.processing_class, row["prompt"], row["rejected"])
        assert prompt_ids == trainer.train_dataset[i]["prompt_ids"]
        assert rejected_ids == trainer.train_dataset[i]["rejected_ids"]


def test_cdpo_sets_group_answers_by_frequency():
    from trainer.preference import build_sets
    from trainer.tasks import TASKS

    task = TASKS["arithmetic"][1](TASKS["arithmetic"][0]())
    row = {"prompt": "47+38=", "answer": "85", "solution": "85"}
    outs = ["85", "75", "75", "75", "84", "85", "7x", "75"]
    pairs, positives, negatives = build_sets(task, [row], [outs])
    assert pairs == [{"prompt": "47+38=", "chosen": "85", "rejected": "75"}]  # most frequent wrong answer
    assert positives == [{"prompt": "47+38=", "solution": "85"}]
    assert [n["solution"] for n in negatives] == ["75", "75", "75", "75"]  # 4 of 6 wrong answers cover ≥ half
    none, _, _ = build_sets(task, [row], [["85"] * 8])  # no wrong answer: no pair
    assert none == []
