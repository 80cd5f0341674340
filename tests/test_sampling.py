"""``trainer.sampler=hashed``: exact sampling from softmax(z / T), and the same completion for a rollout whatever
batch (rank, row, prompt padding) it is generated in."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.sampling import HashedGumbelSampler, fmix32, hashed_uniform, install_hashed_sampler


def test_fmix32_matches_a_plain_integer_reference():
    def ref(x: int) -> int:
        m = 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & m
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & m
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0xDEADBEEF, 0xFFFFFFFF, 0x80000000]
    assert fmix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


def test_uniforms_are_uniform_and_depend_on_every_key():
    u = hashed_uniform(0, 3, torch.arange(64), 5, 4096)
    assert u.shape == (64, 4096) and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.004
    for other in (hashed_uniform(1, 3, torch.arange(64), 5, 4096), hashed_uniform(0, 4, torch.arange(64), 5, 4096),
                  hashed_uniform(0, 3, torch.arange(1, 65), 5, 4096), hashed_uniform(0, 3, torch.arange(64), 6, 4096)):
        assert not torch.equal(u, other)
    assert torch.equal(u[10:20], hashed_uniform(0, 3, torch.arange(10, 20), 5, 4096))


@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (0.7, None), (1.0, 0.8)])
def test_sampling_frequencies_match_softmax(temperature, top_p):
    torch.manual_seed(0)
    vocab, rows = 6, 40000
    logits = torch.randn(vocab) * 1.5
    sampler = HashedGumbelSampler(seed=7)
    sampler.warp_like(temperature, None, top_p)
    sampler.begin(step=0, rollout_ids=torch.arange(rows))
    out = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, vocab).clone())
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == rows * (vocab - 1)
    freq = torch.bincount(out.argmax(-1), minlength=vocab).double() / rows
    p = torch.softmax(logits.double() / temperature, -1)
    if top_p is not None:  # the nucleus: the smallest set of top tokens with mass >= top_p
        order = p.argsort(descending=True)
        cut = int((p[order].cumsum(0) < top_p).sum()) + 1
        q = torch.zeros_like(p)
        q[order[:cut]] = p[order[:cut]]
        p = q / q.sum()
    tol = 4 * torch.sqrt(p * (1 - p) / rows) + 1e-9  # 4 standard errors
    assert ((freq - p).abs() <= tol).all(), (freq, p)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def generate(model, sampler, prompts: list[list[int]], ids: list[int], step: int = 0) -> list[list[int]]:
    """Left-padded batch generation, as TRL does it; returns each row's completion up to its EOS."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sampler.begin(step, torch.tensor(ids))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                             temperature=0.9, top_k=0, pad_token_id=0, eos_token_id=1)
    rows = []
    for seq in out[:, width:].tolist():
        rows.append(seq[: seq.index(1) + 1] if 1 in seq else seq)
    return rows


def test_a_rollout_samples_the_same_completion_in_any_batch():
    model = tiny_model()
    sampler = HashedGumbelSampler(seed=3)
    install_hashed_sampler(model, sampler)
    prompts = [[2, 5, 6], [2, 7], [2, 9, 10, 11, 12], [2, 5, 6], [2, 13], [2, 14, 15]]
    whole = generate(model, sampler, prompts, list(range(6)))
    # two "ranks", each with its own half (other padding widths), and a shuffled batch
    halves = generate(model, sampler, prompts[:3], [0, 1, 2]) + generate(model, sampler, prompts[3:], [3, 4, 5])
    order = [4, 1, 5, 0, 3, 2]
    shuffled = generate(model, sampler, [prompts[i] for i in order], order)
    assert halves == whole
    assert [shuffled[order.index(i)] for i in range(6)] == whole
    assert whole[0] != whole[3] or whole[0] != generate(model, sampler, [prompts[0]], [0], step=1)[0]
    assert len({tuple(r) for r in whole}) > 1 and max(map(len, whole)) > 1


def test_greedy_calls_and_announced_rows_are_checked():
    model = tiny_model()
    sampler = HashedGumbelSampler(seed=0)
    install_hashed_sampler(model, sampler)
    x = torch.tensor([[2, 5, 6]])
    with torch.no_grad():
        greedy = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0)  # not intercepted
        torch.manual_seed(0)
        plain = model.generate(input_ids=x, max_new_tokens=4, do_sample=True, pad_token_id=0)  # not announced
        sampler.begin(0, torch.arange(2))
        with pytest.raises(RuntimeError, match="announced 2"):
            model.generate(input_ids=x, max_new_tokens=4, do_sample=True, pad_token_id=0)
        assert not sampler.armed  # disarmed even when generate fails
        torch.manual_seed(0)
        again = model.generate(input_ids=x, max_new_tokens=4, do_sample=True, pad_token_id=0)
        fresh = tiny_model()
        torch.manual_seed(0)
        reference = fresh.generate(input_ids=x, max_new_tokens=4, do_sample=True, pad_token_id=0)
    assert greedy.shape == (1, 7) and torch.equal(plain, again) and torch.equal(plain, reference)
    assert math.isfinite(float(hashed_uniform(0, 0, torch.arange(1), 0, 2).sum()))
