"""Rollout sampling that does not depend on how the batch is split across ranks (``trainer.sampler=hashed``).

``torch.multinomial`` draws from one RNG stream per process, so the completion sampled for a prompt depends on
which rank generates it and on its row in that rank's batch: one process and two ranks sample different rollouts
from the same seed, and no launch layout can be compared with another. The hashed sampler uses the Gumbel-max
trick instead,

    y_t = argmax_v ( z_v / T + g_v ),   g_v = −log(−log u_v),   u_v = hash(seed, step, rollout id, t, v) ∈ (0, 1),

which is an exact sample from ``softmax(z / T)`` (after top-k / top-p, as TRL sets them), with noise that is a
function of the rollout's *global* id (its row in the gathered generation batch) and the completion position ``t``
only. Any layout of the same step samples the same completions. ``u`` has 32 random bits (a murmur3 ``fmix32``
chain computed in int64 without overflow), enough for any vocabulary, and costs a few element-wise ops on
``[rows, V]`` per generated token.
"""

from __future__ import annotations

import copy
import functools
import types

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2^32`` for ``0 <= x < 2^32`` without int64 overflow (two 16-bit halves of ``c``)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def hashed_uniform(seed: int, step: int, rollout_ids: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """``u[r, v] ∈ (0, 1)``, ``[rows, vocab]`` float64: a pure function of (seed, step, rollout id, position, v)."""
    dev = rollout_ids.device
    key = fmix32(torch.tensor(seed & _M32, device=dev, dtype=torch.int64) ^ 0x9E3779B9)
    key = fmix32(key ^ (step & _M32))
    key = fmix32(key ^ (position & _M32))
    rows = fmix32(key ^ (rollout_ids.to(torch.int64) & _M32))
    tokens = fmix32(torch.arange(vocab, device=dev, dtype=torch.int64) ^ 0x632BE5AB)
    bits = fmix32(rows[:, None] ^ tokens[None, :])
    return (bits.to(torch.float64) + 0.5) / 2.0**32


class HashedGumbelSampler(LogitsProcessor):
    """A logits processor that turns greedy decoding into layout-independent sampling (see the module docstring).

    Call :meth:`begin` before a ``generate`` with the global ids of the batch's rows (an unannounced ``generate``,
    such as the held-out evaluation, samples as usual). The processor applies the generation config's temperature,
    top-k and top-p itself (:meth:`warp_like`) and returns scores that are ``0`` at the sampled token, ``−inf``
    elsewhere, so greedy decoding picks the sample.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.temperature = 1.0
        self.warpers = LogitsProcessorList()
        self.step = 0
        self.rollout_ids: torch.Tensor | None = None
        self._start: int | None = None

    def warp_like(self, temperature: float | None, top_k: int | None, top_p: float | None) -> None:
        self.temperature = temperature or 1.0
        self.warpers = LogitsProcessorList()
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def begin(self, step: int, rollout_ids: torch.Tensor) -> None:
        """Arm the sampler for the next ``generate`` call (other calls sample as usual)."""
        self.step, self.rollout_ids, self._start = step, rollout_ids, None

    @property
    def armed(self) -> bool:
        return self.rollout_ids is not None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.rollout_ids is None or self.rollout_ids.numel() != scores.shape[0]:
            raise RuntimeError(f"hashed sampler: generate() got {scores.shape[0]} rows, begin() announced "
                               f"{None if self.rollout_ids is None else self.rollout_ids.numel()}")
        if self._start is None:
            self._start = input_ids.shape[1]  # the (padded) prompt length: positions count completion tokens
        warped = self.warpers(input_ids, scores.float() / self.temperature)
        u = hashed_uniform(self.seed, self.step, self.rollout_ids.to(scores.device), input_ids.shape[1] - self._start,
                           scores.shape[1])
        gumbel = -torch.log(-torch.log(u))
        choice = (warped.double() + gumbel).argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


def install_hashed_sampler(model, sampler: HashedGumbelSampler) -> None:
    """Route ``model.generate`` through ``sampler``: sampling settings move into the processor, decoding is greedy."""
    previous = model.generate

    @functools.wraps(type(model).generate)
    def generate(self, *args, generation_config=None, logits_processor=None, **kwargs):
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs = config.update(**kwargs)  # generation settings move into the config, model inputs stay
        if not config.do_sample or not sampler.armed:  # greedy, or not a rollout (held-out evaluation)
            return previous(*args, generation_config=config, logits_processor=logits_processor, **kwargs)
        if config.min_p is not None:
            raise ValueError("trainer.sampler=hashed does not implement min_p sampling")
        sampler.warp_like(config.temperature, config.top_k, config.top_p)
        config.do_sample = False
        config.temperature = config.top_p = config.top_k = None
        processors = LogitsProcessorList([*(logits_processor or []), sampler])
        try:
            return previous(*args, generation_config=config, logits_processor=processors, **kwargs)
        finally:
            sampler.rollout_ids = None  # one begin() per generate()

    model.generate = types.MethodType(generate, model)
