"""A packed training forward (two sequences in one row, ``position_ids`` restarting at 0, no attention mask) must keep
the sequences apart. transformers detects packing from ``position_ids`` only when no KV cache is built, so every
training forward of tokensel's statistics head sets ``use_cache=False``; with a cache the second sequence attends to
the first (the failure this guards against, shown below on the plain forward)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.stats_head import add_token_stats_head


def tiny() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def stats(model, ids: list[int], position_ids: list[int], labels: list[int]):
    return model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([position_ids]),
                 labels=torch.tensor([labels]), tokensel_stats=True)


def test_packed_rows_score_like_separate_rows():
    model = tiny()
    assert add_token_stats_head(model, temperature=1.0)
    a, b = [3, 5, 6, 7, 8], [3, 9, 10, 11]
    with torch.no_grad():
        sa = stats(model, a, list(range(len(a))), a)
        sb = stats(model, b, list(range(len(b))), b)
        # the last token of a must not score the first token of b: that label is masked
        packed_labels = a + [-100] + b[1:]
        sp = stats(model, a + b, list(range(len(a))) + list(range(len(b))), packed_labels)
    n = len(a) - 1
    torch.testing.assert_close(sp.logp[0, :n], sa.logp[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sp.logp[0, n + 1 :], sb.logp[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sp.entropy[0, n + 1 :], sb.entropy[0], atol=1e-5, rtol=1e-5)


def test_with_a_cache_packed_rows_attend_to_each_other():
    model = tiny()
    a, b = [3, 5, 6, 7, 8], [3, 9, 10, 11]
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        no_cache = model(input_ids=torch.tensor([a + b]), position_ids=pos, use_cache=False).logits[0, len(a):]
        cache = model(input_ids=torch.tensor([a + b]), position_ids=pos, use_cache=True).logits[0, len(a):]
    torch.testing.assert_close(no_cache, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cache, alone, atol=1e-3)


def test_call_as_forward_runs_hooks_and_restores_forward():
    from trainer.stats_head import call_as_forward

    head = torch.nn.Linear(4, 3)
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    head.register_forward_hook(lambda m, args, out: seen.append("post"))
    x = torch.randn(2, 4)
    out = call_as_forward(head, lambda h: (h @ head.weight.T).sum(-1), x)
    assert seen == ["pre", "post"] and out.shape == (2,)
    assert "forward" not in head.__dict__ and torch.equal(head(x), x @ head.weight.T + head.bias)
    custom = lambda h: h  # noqa: E731 - an instance-level forward (as wrappers install) survives the call
    head.forward = custom
    call_as_forward(head, lambda h: h * 2, x)
    assert head.forward is custom
