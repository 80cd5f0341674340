"""specs/kernels.md §8.4: on the tiny model, TRL 1.16's fused LM head and our statistics head agree."""

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

import kernels
from trainer.modeling import build_model
from trainer.schema import ModelConfig
from trainer.stats_head import add_token_stats_head


def test_trl_fused_head_equals_token_stats_on_the_backbone():
    model, _ = build_model(ModelConfig(), seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    labels = input_ids.clone()
    labels[0, :5] = -100  # prompt tokens are not scored
    labels[2, 9:] = -100
    T = 0.7
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=T, outputs=("log_probs", "entropy"))
    with torch.no_grad():
        fused = trl_model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        ours = kernels.token_stats(hidden[:, :-1], model.lm_head.weight, targets, temperature=T,
                                   mask=targets != -100)
        ours_head = copy.deepcopy(model)
        assert add_token_stats_head(ours_head, T)
        via_head = ours_head(input_ids=input_ids, labels=labels, tokensel_stats=True)
    mask = targets != -100
    n = targets.shape[1]
    trl_logp, trl_ent = fused.log_probs[..., -n:], fused.entropy[..., -n:]
    torch.testing.assert_close(ours.logp[mask], trl_logp[mask], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours.entropy[mask], trl_ent[mask], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(via_head.logp, ours.logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_head.entropy, ours.entropy, rtol=0, atol=1e-6)
    assert (ours.logp[~mask] == 0).all() and (ours.entropy[~mask] == 0).all()
