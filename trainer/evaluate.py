"""Held-out accuracy: greedy decoding (Pass@1) scored by the task's verifiable reward."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .tasks import Row, Task


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generate"
) -> list[str]:
    """Greedy completions of ``prompts``, decoded without special tokens."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=len(prompts) <= batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return out


def accuracy(model, tokenizer, task: Task, rows: list[Row], max_new_tokens: int, batch_size: int) -> float:
    """Fraction of ``rows`` whose greedy completion earns reward 1."""
    if not rows:
        raise ValueError("accuracy needs at least one held-out row")
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size, "eval")
    return sum(task.score(c, r) for c, r in zip(completions, rows, strict=True)) / len(rows)
