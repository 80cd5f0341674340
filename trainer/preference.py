"""Preference data for token-level DPO: sampled from the warm model on a bundled task (the offline default), with
cDPO critical-token weights on request; or a preference dataset (prompt / chosen / rejected) by hub id or local file.

The cDPO pipeline (``specs/token_dpo.md`` §7.3), run by ``build_preference_rows`` and cached by content hash:

1. **sample** ``samples_per_prompt`` completions per training prompt from the warm (base) model, grade them with the
   task's verifier;
2. **build the sets**, grouping a question's answers by frequency: the positive SFT set (one response with the most
   frequent correct answer), the negative SFT set (incorrect responses whose answers cover the top half of the
   cumulative frequency), and one pair per question (chosen: the most frequent correct answer; rejected: the most
   frequent incorrect one); questions without both are skipped;
3. **train the CE models**: two LoRA adapters (MLP projections, so the LM head stays shared) on the positive and on
   the negative set;
4. **score** every rejected completion, tokenized exactly as TRL's ``DPOTrainer`` will (EOS appended, completion from
   the common token prefix): ``s_t = softmax((1+λ)z^p − λz^q)[y_t]``, weight ``1 − s_t``, EOS weight 1;
5. write ``rejected_token_weights`` (and the scores, for analysis) next to prompt / chosen / rejected.

With ``token_rewards=treg`` the warm model (the reference) also scores every chosen and rejected token under a
"better" and a "worse" rewrite of the prompt (T-REG's contrastive prompting, spec §7.4).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from objectives.token_dpo import cdpo_token_weights, treg_token_rewards

from .evaluate import generate_completions
from .schema import WarmupConfig
from .tasks import Row, Task
from .warmup import publish_entry, train_sft

CACHE_VERSION = 1


def trl_completion_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL 1.16's ``DPOTrainer`` tokenizes non-conversational data: EOS appended,
    the completion starting at the common token prefix of prompt and prompt+completion."""
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    p = tokenizer(prompt)["input_ids"]
    pc = tokenizer(prompt + completion)["input_ids"]
    n = 0
    while n < min(len(p), len(pc)) and p[n] == pc[n]:
        n += 1
    return p[:n], pc[n:]


def sample_answers(model, tokenizer, rows: list[Row], k: int, temperature: float, max_new_tokens: int,
                   batch_size: int, seed: int) -> list[list[str]]:
    """``k`` sampled completions per row (rows repeated consecutively)."""
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    flat = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=temperature,
                                seed=seed, desc=f"preference data: sampling x{k}")
    return [flat[i * k : (i + 1) * k] for i in range(len(rows))]


def build_sets(task: Task, rows: list[Row], completions: list[list[str]]):
    """(pairs, positive SFT rows, negative SFT rows) by answer frequency (the cDPO authors' grouping)."""
    pairs, positives, negatives = [], [], []
    for row, outs in zip(rows, completions, strict=True):
        good = [task.score(c, row) > 0 for c in outs]
        correct = [c for c, ok in zip(outs, good, strict=True) if ok]
        wrong = [c for c, ok in zip(outs, good, strict=True) if not ok]
        if correct:
            positives.append({"prompt": row["prompt"], "solution": correct[0]})
        if not wrong:
            continue
        groups = Counter(task.extract(c) for c in wrong)
        order = [a for a, _ in groups.most_common()]
        covered = 0
        for answer in order:  # answers covering the top half of the cumulative frequency
            if covered >= 0.5 * len(wrong):
                break
            negatives += [{"prompt": row["prompt"], "solution": c} for c in wrong if task.extract(c) == answer]
            covered += groups[answer]
        if correct:
            rejected = next(c for c in wrong if task.extract(c) == order[0])
            pairs.append({"prompt": row["prompt"], "chosen": correct[0], "rejected": rejected})
    return pairs, positives, negatives


def train_ce_model(base, tokenizer, rows: list[Row], lora_r: int, steps: int, learning_rate: float,
                   batch_size: int, seed: int):
    """A LoRA adapter (MLP projections) on ``rows`` by supervised fine-tuning; the base weights are not touched."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                           target_modules=["gate_proj", "up_proj", "down_proj"]))
    train_sft(model, tokenizer, rows, WarmupConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size),
              seed)
    return model.eval()


@torch.no_grad()
def completion_logits(model, tokenizer, prompt_ids: list[list[int]], comp_ids: list[list[int]]):
    """Logits ``[B, T, V]`` at the positions that predict each completion token, right-padded, and the mask."""
    T = max(len(c) for c in comp_ids)
    seqs = [p + c for p, c in zip(prompt_ids, comp_ids, strict=True)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    out = torch.zeros(len(seqs), T, logits.shape[-1])
    targets = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, comp_ids, strict=True)):
        out[i, : len(c)] = logits[i, len(p) - 1 : len(p) + len(c) - 1]
        targets[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
    return out, targets, mask


def score_rejected(positive, negative, tokenizer, pairs: list[dict], lam: float, batch_size: int = 64) -> None:
    """Adds ``rejected_token_weights`` (1 − s, EOS 1) and ``rejected_token_scores`` (s) to every pair."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        split = [trl_completion_ids(tokenizer, p["prompt"], p["rejected"]) for p in chunk]
        p_ids, c_ids = [s[0] for s in split], [s[1] for s in split]
        zp, y, mask = completion_logits(positive, tokenizer, p_ids, c_ids)
        zq, _, _ = completion_logits(negative, tokenizer, p_ids, c_ids)
        w = cdpo_token_weights(zp, zq, y, mask, lam=lam)
        for i, pair in enumerate(chunk):
            n = len(c_ids[i])
            weights = w.weight[i, :n].tolist()
            weights[-1] = 1.0  # the EOS position keeps weight 1 (the authors' choice)
            pair["rejected_token_weights"] = weights
            pair["rejected_token_scores"] = w.score[i, :n].tolist()


@torch.no_grad()
def score_treg(reference, tokenizer, pairs: list[dict], better_prefix: str, worse_prefix: str,
               batch_size: int = 64) -> None:
    """T-REG token rewards (spec §7.4): the reference model teacher-forces each training completion (its token ids,
    not the string) after the prompt rewritten to "better" and to "worse"; ``r̂ = σ(log π_b − log π_w) − ½``."""
    for side in ("chosen", "rejected"):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            comp = [trl_completion_ids(tokenizer, p["prompt"], p[side])[1] for p in chunk]
            logps = []
            for prefix in (better_prefix, worse_prefix):
                prompts = [tokenizer(prefix + p["prompt"])["input_ids"] for p in chunk]
                z, y, mask = completion_logits(reference, tokenizer, prompts, comp)
                logps.append(torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1))
            r = treg_token_rewards(logps[0], logps[1], mask)
            for i, pair in enumerate(chunk):
                pair[f"{side}_token_rewards"] = r[i, : len(comp[i])].tolist()


def build_preference_rows(model, tokenizer, task: Task, train_rows: list[Row], pcfg, max_new_tokens: int,
                          batch_size: int, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """Stages 1–5 (module docstring): pairs and their statistics."""
    rows = train_rows[: pcfg.prompts]
    completions = sample_answers(model, tokenizer, rows, pcfg.samples_per_prompt, pcfg.temperature, max_new_tokens,
                                 batch_size, seed)
    pairs, positives, negatives = build_sets(task, rows, completions)
    graded = [task.score(c, r) for r, outs in zip(rows, completions, strict=True) for c in outs]
    info: dict[str, Any] = {"prompts": len(rows), "samples": len(graded), "sample_accuracy": sum(graded) / len(graded),
                            "pairs": len(pairs), "positive_sft": len(positives), "negative_sft": len(negatives),
                            "tokenizer": tokenizer_fingerprint(tokenizer), "token_weights": pcfg.token_weights,
                            "cdpo_lambda": pcfg.cdpo_lambda, "token_rewards": pcfg.token_rewards}
    if not pairs:
        raise ValueError(f"no preference pair: none of the {len(rows)} prompts has both a correct and an incorrect "
                         f"sample (sample accuracy {info['sample_accuracy']:.2f}); raise preference.samples_per_prompt "
                         "or the temperature")
    if pcfg.token_weights == "cdpo":
        if not negatives or not positives:
            raise ValueError("cDPO needs both correct and incorrect samples to train its two CE models")
        pos = train_ce_model(model, tokenizer, positives, pcfg.ce_lora_r, pcfg.ce_steps, pcfg.ce_learning_rate,
                             pcfg.ce_batch_size, seed)
        neg = train_ce_model(model, tokenizer, negatives, pcfg.ce_lora_r, pcfg.ce_steps, pcfg.ce_learning_rate,
                             pcfg.ce_batch_size, seed + 1)
        score_rejected(pos, neg, tokenizer, pairs, pcfg.cdpo_lambda)
        weights = [w for p in pairs for w in p["rejected_token_weights"][:-1]]
        info["rejected_critical_frac"] = sum(w >= 0.5 for w in weights) / max(1, len(weights))
    if pcfg.token_rewards == "treg":
        score_treg(model, tokenizer, pairs, pcfg.treg_better_prefix, pcfg.treg_worse_prefix)
        rewards = [r for p in pairs for r in p["rejected_token_rewards"] + p["chosen_token_rewards"]]
        info["treg_reward_mean_abs"] = sum(abs(r) for r in rewards) / max(1, len(rewards))
    return pairs, info


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def cached_preference_rows(key: str, cache_dir: Path, build) -> tuple[list[dict], dict[str, Any]]:
    """Load ``<cache_dir>/<key>/pairs.jsonl`` or build and publish it (atomic, safe when ranks build it at once)."""
    target = cache_dir / key
    if (target / "done").exists():
        pairs = [json.loads(line) for line in (target / "pairs.jsonl").read_text().splitlines()]
        return pairs, {**json.loads((target / "meta.json").read_text()), "cached": True, "path": str(target)}
    pairs, info = build()

    def write(folder: Path) -> None:
        (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (folder / "meta.json").write_text(json.dumps(info, indent=2))
        (folder / "done").write_text("")

    publish_entry(cache_dir, key, write)
    return pairs, {**info, "cached": False, "path": str(target)}


def load_preference_dataset(source: str) -> list[dict]:
    """A preference dataset by local JSONL/JSON/Parquet path or hub id (split ``train``): prompt / chosen / rejected
    (+ optional weight columns)."""
    from datasets import load_dataset

    path = Path(source)
    if path.exists():
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(path.suffix.lstrip("."))
        if kind is None:
            raise ValueError(f"preference.source {source}: expected a .jsonl, .json or .parquet file")
        ds = load_dataset(kind, data_files=str(path), split="train")
    else:
        name, _, config = source.partition(":")
        ds = load_dataset(name, config or None, split="train")
    missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise ValueError(f"preference.source {source}: missing column(s) {sorted(missing)} "
                         f"(columns present: {ds.column_names})")
    return list(ds)
