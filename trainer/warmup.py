"""Supervised warm-up on the task's demonstrations, cached by a hash of everything that determines it.

RL from a random model has no reward signal; a short warm-up gives the policy a starting accuracy that RL can
then improve. The second run with the same settings loads the cached weights instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .schema import WarmupConfig
from .tasks import Row

CACHE_VERSION = 1  # bump when the warm-up procedure changes, so stale caches are not reused


def cache_key(model_cfg: dict, task_cfg: dict, warmup: WarmupConfig, seed: int) -> str:
    blob = json.dumps(
        {"v": CACHE_VERSION, "model": model_cfg, "task": task_cfg, "warmup": asdict(warmup) | {"cache_dir": None},
         "seed": seed},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_batch(tokenizer, rows: list[Row], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompt + solution + eos; the loss covers the solution and eos only (prompt and padding are -100)."""
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    answers = [tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seq = p + a
        start = length - len(seq)  # left padding, as in generation
        ids[i, start:] = torch.tensor(seq)
        labels[i, start + len(p) :] = torch.tensor(a)
        attn[i, start:] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def train_sft(model, tokenizer, rows: list[Row], cfg: WarmupConfig, seed: int) -> list[float]:
    """AdamW on the demonstrations for ``cfg.steps`` steps; returns the loss curve."""
    if not rows or "solution" not in rows[0]:
        raise ValueError("the warm-up needs training rows with a 'solution' (demonstration)")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / (cfg.steps + 1)))
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="warm-up (SFT)")
    for _ in bar:
        batch = sft_batch(tokenizer, rng.sample(rows, min(cfg.batch_size, len(rows))), device)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def publish_entry(cache_dir: Path, key: str, write) -> Path:
    """Create the cache entry ``<cache_dir>/<key>`` (which must end up holding a ``done`` file) atomically.

    ``write(folder)`` fills a private temporary folder that is then renamed into place: a killed writer never leaves
    a half-written entry, and writers that build the same entry at once (the ranks of a job, or two runs) each write
    their own copy — the first rename wins, the others discard theirs, and nobody deletes another's files.
    """
    target = cache_dir / key
    tmp = cache_dir / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if target.exists() and not (target / "done").exists():
            shutil.rmtree(target, ignore_errors=True)  # a damaged entry (from before this protocol)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "done").exists():  # not "another writer was first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def warm_start(model, tokenizer, rows: list[Row], cfg: WarmupConfig, seed: int, cache_dir: Path, key: str):
    """Load the cached warm-up for ``key`` or train it (and cache it). Returns ``(model, info)``."""
    target = cache_dir / key
    if cfg.cache and (target / "done").exists():
        state = torch.load(target / "model.pt", map_location=next(model.parameters()).device, weights_only=True)
        model.load_state_dict(state)
        return model, {"cached": True, "path": str(target)}
    losses = train_sft(model, tokenizer, rows, cfg, seed)
    info = {"cached": False, "path": str(target), "final_loss": losses[-1] if losses else None}
    if cfg.cache:
        def write(folder: Path) -> None:
            torch.save(model.state_dict(), folder / "model.pt")
            (folder / "done").write_text(json.dumps(info))

        publish_entry(cache_dir, key, write)
    return model, info
