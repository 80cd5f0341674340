"""Token-level DPO (``specs/token_dpo.md``): the §9 vectors D1–D10, TDPO against the authors' formula re-derived
here, the κ direction through the kernels, cDPO's score from logits and from hidden states, and the reduction to
TRL 1.16's sigmoid DPO loss computed by a real ``DPOTrainer``."""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from objectives import TokenBatch, build
from objectives.token_dpo import (
    PRESETS,
    cdpo_token_weights,
    cdpo_token_weights_from_hidden,
    token_dpo_loss,
    token_dpo_preset,
    treg_token_rewards,
)

D = torch.float64


def t(x):
    return torch.tensor([x], dtype=D)


def ones(n):
    return torch.ones(1, n, dtype=torch.bool)


def zeros_like(x):
    return torch.zeros_like(x)


def pair(lw, ll, **kw):
    """One pair from log-ratios (reference 0) with grads on the policy sides."""
    pc, pr = t(lw).requires_grad_(), t(ll).requires_grad_()
    out = token_dpo_loss(pc, zeros_like(pc), pr, zeros_like(pr), ones(len(lw)), ones(len(ll)), **kw)
    return out, pc, pr


def test_d1_dpo():
    out, pc, _ = pair([1.0], [-0.5])
    assert out.loss.item() == pytest.approx(0.620957, abs=1e-6)
    out.loss.backward()
    assert pc.grad.item() == pytest.approx(-0.1 * torch.sigmoid(torch.tensor(-0.15)).item(), abs=1e-9)
    assert pc.grad.item() == pytest.approx(-0.046257, abs=1e-6)
    assert out.metrics["rewards/margins"] == pytest.approx(0.15) and out.metrics["rewards/accuracies"] == 1.0


def tdpo_reference(lam_w, lam_l, k_w, k_l, beta, alpha, stop_grad):
    """The authors' ``tdpo_loss`` (trainers.py), re-derived: logits = (Λ_w − Λ_l) − α(K_l − K_w), sg on K_w for TDPO2."""
    k_w = k_w.detach() if stop_grad else k_w
    margin = (lam_w - lam_l) - alpha * (k_l - k_w)
    return -F.logsigmoid(beta * margin)


@pytest.mark.parametrize("preset, expected", [("tdpo1", 0.639659), ("tdpo2", 0.630258)])
def test_d2_tdpo(preset, expected):
    k_w, k_l = t([0.2]).requires_grad_(), t([0.6]).requires_grad_()
    pc, pr = t([1.0]), t([-0.5])
    out = token_dpo_loss(pc, zeros_like(pc), pr, zeros_like(pr), ones(1), ones(1), kl_chosen=k_w, kl_rejected=k_l,
                         **token_dpo_preset(preset))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    if preset == "tdpo2":
        assert k_l.grad.item() == pytest.approx(0.023377, abs=1e-6)
        assert k_w.grad is None  # stop-gradient: no gradient at all to the chosen KL
    else:
        assert k_w.grad.item() == pytest.approx(-k_l.grad.item())


@pytest.mark.parametrize("preset", ["tdpo1", "tdpo2"])
def test_tdpo_equals_the_authors_formula_on_random_tensors(preset):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    cfg = token_dpo_preset(preset)
    pc, pr, rc, rr = (torch.randn(B, T, generator=g, dtype=D) for _ in range(4))
    kc, kr = (torch.rand(B, T, generator=g, dtype=D).requires_grad_() for _ in range(2))
    mc, mr = (torch.rand(B, T, generator=g) < 0.8 for _ in range(2))
    ours = token_dpo_loss(pc, rc, pr, rr, mc, mr, kl_chosen=kc, kl_rejected=kr, **cfg).loss
    lam_w, lam_l = ((pc - rc) * mc).sum(-1), ((pr - rr) * mr).sum(-1)
    ref = tdpo_reference(lam_w, lam_l, (kc * mc).sum(-1), (kr * mr).sum(-1), 0.1, cfg["alpha_kl"],
                         cfg["stop_grad_chosen_kl"]).mean()
    assert abs(ours.item() - ref.item()) < 1e-12
    g_ours = torch.autograd.grad(ours, kr)[0]
    assert torch.allclose(g_ours, torch.autograd.grad(ref, kr)[0], atol=1e-12)


def test_d3_kappa_is_the_forward_kl_from_the_reference():
    p_ref, p_theta = torch.tensor([0.5, 0.3, 0.2], dtype=D), torch.tensor([0.7, 0.2, 0.1], dtype=D)
    h = torch.ones(1, 1, dtype=D)
    s = kernels.token_stats(h, p_theta.log()[:, None], torch.zeros(1, dtype=torch.long), teacher_hidden=h,
                            teacher_weight=p_ref.log()[:, None], divergences=("forward_kl", "reverse_kl"))
    assert s.forward_kl.item() == pytest.approx(0.092033, abs=1e-6)  # κ = KL(π_ref‖π_θ): the reference as teacher
    assert s.reverse_kl.item() == pytest.approx(0.085123, abs=1e-6)  # the wrong direction


def test_d4_cdpo_score():
    zp, zq = torch.tensor([[[2.0, 1.0, 0.0]]], dtype=D), torch.tensor([[[0.0, 2.0, 0.0]]], dtype=D)
    for y, weight in ((1, 0.982332), (0, 0.035337)):
        w = cdpo_token_weights(zp, zq, torch.tensor([[y]]), ones(1))
        assert w.weight.item() == pytest.approx(weight, abs=1e-6)
    s = torch.softmax(2 * zp - zq, -1).reshape(-1)
    assert s.tolist() == pytest.approx([0.964663, 0.017668, 0.017668], abs=1e-6)
    # the log-prob form: per-position normalisers cancel in the softmax
    lp = cdpo_token_weights(torch.log_softmax(zp, -1), torch.log_softmax(zq, -1), torch.tensor([[1]]), ones(1))
    assert lp.weight.item() == pytest.approx(0.982332, abs=1e-6)
    masked = cdpo_token_weights(zp, zq, torch.tensor([[1]]), torch.zeros(1, 1, dtype=torch.bool))
    assert masked.weight.item() == 0.0 and masked.score.item() == 0.0


def test_cdpo_from_hidden_states_equals_the_logits_form():
    g = torch.Generator().manual_seed(1)
    B, T, d, V = 2, 5, 8, 13
    hp, hn = torch.randn(B, T, d, generator=g, dtype=D), torch.randn(B, T, d, generator=g, dtype=D)
    W, b = torch.randn(V, d, generator=g, dtype=D), torch.randn(V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    a = cdpo_token_weights(hp @ W.T + b, hn @ W.T + b, y, mask, lam=0.7)
    h = cdpo_token_weights_from_hidden(hp, hn, W, b, y, mask, lam=0.7)
    assert torch.allclose(a.weight, h.weight, atol=1e-6) and torch.allclose(a.score, h.score, atol=1e-6)


def test_d5_cdpo_sequence_form_and_zero_weight_zero_gradient():
    a_l = t([1.0, 0.2, 0.9])
    out, _, pr = pair([0.2, 0.3], [-0.1, -0.4, 0.5], rejected_weights=a_l)
    assert out.loss.item() == pytest.approx(0.681713, abs=1e-6)
    zero = t([1.0, 0.0, 0.9])
    out, _, pr = pair([0.2, 0.3], [-0.1, -0.4, 0.5], rejected_weights=zero)
    out.loss.backward()
    assert pr.grad[0, 1].item() == 0.0 and pr.grad[0, 0].item() != 0.0


def test_d6_cdpo_per_position_and_the_authors_denominator():
    lw, ll = t([0.2, 0.3, 0.0]), t([-0.1, -0.4, 0.5])
    mw = torch.tensor([[True, True, False]])
    out = token_dpo_loss(lw, zeros_like(lw), ll, zeros_like(ll), mw, ones(3), rejected_weights=t([1.0, 0.2, 0.9]),
                         **token_dpo_preset("cdpo_per_position"))
    assert out.loss.item() == pytest.approx(0.689496, abs=1e-6)
    h = torch.tensor([0.030, 0.038, -0.045], dtype=D)
    assert (-F.logsigmoid(h)).tolist() == pytest.approx([0.678260, 0.674328, 0.715900], abs=1e-6)
    official = (3 * out.loss.item() + 2 * math.log(2)) / 5  # the authors' mean over 5 positions, 2 of them prompt
    assert official == pytest.approx(0.690956, abs=1e-6)


def test_d7_treg_pieces():
    r = treg_token_rewards(t([-1.0, -0.5]), t([-2.0, -0.3]), ones(2))
    assert r.reshape(-1).tolist() == pytest.approx([0.231059, -0.049834], abs=1e-6)
    assert treg_token_rewards(t([-1.0]), t([-2.0]), torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0
    assert torch.sigmoid(torch.tensor(-0.15)).item() == pytest.approx(0.462570, abs=1e-6)
    # R(y) = −β Σ r̂ log π: 0.010194; r̂ ≡ 0 gives exactly 0 regulariser
    pc, pr = t([-0.7, -1.2]), t([-0.5, -2.0])
    base = token_dpo_loss(pc, t([-1.2, -1.7]), pr, t([-0.4, -1.6]), ones(2), ones(2)).loss
    zero = token_dpo_loss(pc, t([-1.2, -1.7]), pr, t([-0.4, -1.6]), ones(2), ones(2), treg_alpha=0.5,
                          treg_rewards=(torch.zeros(1, 2, dtype=D), torch.zeros(1, 2, dtype=D))).loss
    assert zero.item() == base.item()


def test_d8_treg_end_to_end():
    pc, pr = t([-0.7, -1.2]).requires_grad_(), t([-0.5, -2.0]).requires_grad_()
    r_w = treg_token_rewards(t([-1.0, -0.5]), t([-2.0, -0.3]), ones(2)).double()
    cfg = token_dpo_preset("treg") | {"treg_alpha": 0.5}
    out = token_dpo_loss(pc, t([-1.2, -1.7]), pr, t([-0.4, -1.6]), ones(2), ones(2),
                         treg_rewards=(r_w, t([-0.2, 0.1])), **cfg)
    assert out.loss.item() == pytest.approx(0.625628, abs=1e-6)
    out.loss.backward()
    assert pc.grad.reshape(-1).tolist() == pytest.approx([-0.051601, -0.045104], abs=1e-6)
    assert pr.grad.reshape(-1).tolist() == pytest.approx([0.050883, 0.043944], abs=1e-6)
    assert out.metrics["treg/weight"] == pytest.approx(0.462570, abs=1e-6)


def test_d9_pair_weights_divide_by_the_pair_count():
    pc = torch.tensor([[1.0, 0.0], [0.2, 0.3]], dtype=D)
    pr = torch.tensor([[-0.5, 0.0, 0.0], [-0.1, -0.4, 0.5]], dtype=D)
    mc = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    mr = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    a_l = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.2, 0.9]], dtype=D)
    out = token_dpo_loss(pc, zeros_like(pc), pr, zeros_like(pr), mc, mr, rejected_weights=a_l,
                         example_weight=torch.tensor([1.0, 0.5], dtype=D))
    assert out.loss.item() == pytest.approx((0.620957 + 0.5 * 0.681713) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.480907, abs=1e-6)


def test_d10_presets_uniform_weights_and_splits():
    assert PRESETS["tdpo2"] == {"alpha_kl": 0.5, "stop_grad_chosen_kl": True, "treg_alpha": 0.0, "per_position": False}
    assert PRESETS["cdpo_per_position"]["per_position"] and PRESETS["treg"]["treg_alpha"] == 0.25
    g = torch.Generator().manual_seed(3)
    B, T = 8, 6
    pc, pr, rc, rr = (torch.randn(B, T, generator=g, dtype=D) for _ in range(4))
    mc, mr = (torch.rand(B, T, generator=g) < 0.8 for _ in range(2))
    c = 2.5
    scaled = token_dpo_loss(pc, rc, pr, rr, mc, mr, chosen_weights=torch.full((B, T), c, dtype=D),
                            rejected_weights=torch.full((B, T), c, dtype=D)).loss
    assert scaled.item() == pytest.approx(token_dpo_loss(pc, rc, pr, rr, mc, mr, beta=0.1 * c).loss.item(), abs=1e-12)
    # 8 micro-batches of 1 pair, each rescaled to the global pair count (B·W/N_P), sum to the whole batch's loss
    p = pc.clone().requires_grad_()
    whole = token_dpo_loss(p, rc, pr, rr, mc, mr).loss
    g_whole = torch.autograd.grad(whole, p)[0]
    parts = sum(token_dpo_loss(p[i : i + 1], rc[i : i + 1], pr[i : i + 1], rr[i : i + 1], mc[i : i + 1],
                               mr[i : i + 1]).loss * (1 / B) for i in range(B))
    assert abs(parts.item() - whole.item()) < 1e-12
    assert torch.allclose(torch.autograd.grad(parts, p)[0], g_whole, atol=1e-12)


def test_invalid_inputs_raise():
    pc, m = t([1.0, 0.5]), ones(2)
    base = (pc, zeros_like(pc), pc, zeros_like(pc), m, m)
    with pytest.raises(ValueError, match="needs kl_chosen"):
        token_dpo_loss(*base, alpha_kl=0.5)
    with pytest.raises(ValueError, match="needs treg_rewards"):
        token_dpo_loss(*base, treg_alpha=0.1)
    with pytest.raises(ValueError, match="neither alpha_kl nor treg_alpha"):
        token_dpo_loss(*base, per_position=True, alpha_kl=0.5, kl_chosen=pc, kl_rejected=pc)
    with pytest.raises(ValueError, match="one layout"):
        token_dpo_loss(pc, pc, t([1.0]), t([1.0]), m, ones(1), per_position=True)
    with pytest.raises(ValueError, match="negative or non-finite"):
        token_dpo_loss(*base, rejected_weights=t([1.0, -0.1]))
    with pytest.raises(ValueError, match="negative or non-finite"):
        token_dpo_loss(*base, chosen_weights=t([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="detached"):
        token_dpo_loss(*base, chosen_weights=t([1.0, 1.0]).requires_grad_())
    with pytest.raises(ValueError, match="non-finite"):
        token_dpo_loss(*base, treg_alpha=0.1, treg_rewards=(t([float("inf"), 0.0]), t([0.0, 0.0])))
    with pytest.warns(UserWarning, match="outside"):
        token_dpo_loss(*base, treg_alpha=0.1, treg_rewards=(t([0.7, 0.0]), t([0.0, 0.0])))
    with pytest.raises(ValueError, match="unknown token-DPO preset"):
        token_dpo_preset("tdpo3")
    # all weights 0 on both sides: h = 0, loss ln 2, no gradient
    p = pc.clone().requires_grad_()
    out = token_dpo_loss(p, zeros_like(pc), pc, zeros_like(pc), m, m, chosen_weights=zeros_like(pc),
                         rejected_weights=zeros_like(pc))
    assert out.loss.item() == pytest.approx(math.log(2))
    assert torch.autograd.grad(out.loss, p)[0].abs().max() == 0


def test_registry_view_splits_chosen_and_rejected_rows():
    g = torch.Generator().manual_seed(4)
    logp, ref = torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D)
    mask = torch.rand(6, 5, generator=g) < 0.8
    w = torch.rand(6, 5, generator=g, dtype=D)
    out = build("token_dpo", preset="cdpo")(TokenBatch(logp=logp, mask=mask, ref_logp=ref), token_weights=w)
    direct = token_dpo_loss(logp[:3], ref[:3], logp[3:], ref[3:], mask[:3], mask[3:], chosen_weights=w[:3],
                            rejected_weights=w[3:])
    assert out.loss.item() == direct.loss.item()
    assert out.token_weights.shape == (6, 5)


# ---- reduction: TRL 1.16 DPOTrainer, loss_type="sigmoid" ------------------------------------------------------------
def test_dpo_preset_equals_trl_dpo_trainer_loss_and_gradients(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trainer.modeling import build_tiny
    from trainer.schema import ModelConfig, TinyModelConfig

    tiny = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                            architecture="llama"))
    model, tok = build_tiny(tiny, seed=0)
    ref_model, _ = build_tiny(tiny, seed=1)
    data = Dataset.from_list([{"prompt": "12+7=", "chosen": "19", "rejected": "18"},
                              {"prompt": "3+45=", "chosen": "48", "rejected": "4"}])
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     per_device_train_batch_size=2, max_length=32)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    loss_trl = trainer.compute_loss(model, batch)
    grads_trl = torch.autograd.grad(loss_trl, list(model.parameters()))

    mask = batch["completion_mask"][:, 1:].bool()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
          "fused_lm_head": True, "use_cache": False}
    logp = trainer.model(**kw).log_probs[:, -mask.shape[1]:]
    with torch.no_grad():
        ref = trainer.ref_model(**kw).log_probs[:, -mask.shape[1]:]
    ours = build("token_dpo", preset="dpo", beta=0.1)(TokenBatch(logp=logp, mask=mask, ref_logp=ref)).loss
    grads = torch.autograd.grad(ours, list(model.parameters()))
    assert abs(ours.item() - loss_trl.item()) <= 1e-6
    for a, b in zip(grads, grads_trl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
