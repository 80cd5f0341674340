"""Held-out accuracy, scored by the task's verifiable reward.

Two estimates of Pass@1 are computed:

* ``sampled``: the mean reward of ``samples`` completions per prompt at the rollout temperature — the quantity
  GRPO maximises (reported as avg@k in most RL papers);
* ``greedy``: one greedy completion per prompt (SPINE reports greedy Pass@1).

``eval.metric`` picks which one the summary calls ``accuracy_*``; both are always recorded.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .tasks import Row, Task


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, *, temperature: float = 0.0,
    seed: int = 0, desc: str = "generate",
) -> list[str]:
    """Completions of ``prompts`` (greedy when ``temperature == 0``), decoded without special tokens."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # sampled evaluation is reproducible and does not disturb the training RNG
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **sampling,
        )
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return out


def evaluate(model, tokenizer, task: Task, rows: list[Row], *, max_new_tokens: int, batch_size: int,
             samples: int, temperature: float, seed: int) -> dict[str, float]:
    """``{"greedy": ..., "sampled": ...}`` accuracy on ``rows``."""
    if not rows:
        raise ValueError("evaluation needs at least one held-out row")
    prompts = [r["prompt"] for r in rows]
    greedy = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, desc="eval (greedy)")
    result = {"greedy": _mean_score(task, greedy, rows)}
    if samples > 0:
        sampled = generate_completions(model, tokenizer, prompts * samples, max_new_tokens, batch_size,
                                       temperature=temperature, seed=seed, desc=f"eval (sampled x{samples})")
        result["sampled"] = _mean_score(task, sampled, rows * samples)
    return result


def _mean_score(task: Task, completions: list[str], rows: list[Row]) -> float:
    return sum(task.score(c, r) for c, r in zip(completions, rows, strict=True)) / len(rows)
