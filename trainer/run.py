"""One run, top to bottom: build (model, task, data) -> warm-up -> evaluate -> GRPO -> evaluate -> summary."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .checkpoints import MarkComplete, checkpoint_step, last_complete, truncate_metrics, write_atomic
from .config import Resolved, selection_pass_enabled
from .distill import TipDistillationTrainer
from .distributed import deepspeed_config, full_weights, init_deepspeed, is_main_process, run_directory, world_size
from .dpo import TokenDPOTrainer
from .evaluate import evaluate
from .grpo_adapter import TokenSelectiveGRPOTrainer
from .modeling import build_model, count_parameters
from .preference import build_preference_rows, cached_preference_rows, load_preference_dataset, tokenizer_fingerprint
from .rewards import MajorityVoteReward, task_reward
from .tasks import TASKS
from .teacher import build_teacher
from .tracking import CompactProgress, MetricsCallback, init_wandb
from .warmup import cache_key, warm_start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def run(resolved: Resolved) -> dict[str, Any]:
    cfg = resolved.cfg
    start = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.seed)
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved_cfg = OmegaConf.to_container(cfg, resolve=True)
    main = is_main_process()
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # ---- build: model, task, data ------------------------------------------------------------------------------
    if cfg.deepspeed.enabled:
        init_deepspeed(cfg)
    model, tokenizer = build_model(cfg.model, cfg.seed)
    task = TASKS[resolved.task_config.name][1](resolved.task_config)
    train_rows, eval_rows = task.splits(cfg.seed)
    _check_lengths(cfg, tokenizer, train_rows + eval_rows)
    say = print if main else (lambda *a, **k: None)
    say(f"[tokensel] {cfg.experiment}: model {cfg.model.name_or_path or 'tiny (local)'} "
        f"({count_parameters(model) / 1e6:.2f}M params), task {task.name} "
        f"({len(train_rows)} train / {len(eval_rows)} held-out), objective {resolved.objective.name}")

    # ---- warm-up (cached) ----------------------------------------------------------------------------------------
    warmup_info: dict[str, Any] = {"enabled": False}
    if cfg.warmup.enabled:
        cache_dir = Path(cfg.warmup.cache_dir or Path(cfg.run.root) / ".cache" / "warmup")
        key = cache_key(resolved_cfg["model"], resolved_cfg["task"], OmegaConf.to_object(cfg.warmup), cfg.seed)
        model, warmup_info = warm_start(model, tokenizer, train_rows, cfg.warmup, cfg.seed, cache_dir, key)
        say(f"[tokensel] warm-up {'loaded from cache' if warmup_info['cached'] else 'trained'}: {warmup_info['path']}")

    def held_out(m) -> dict[str, float]:
        if not cfg.eval.enabled:
            return {}
        with full_weights(m):  # every rank gathers, then generates alone: no lock-step needed
            return evaluate(m, tokenizer, task, eval_rows, max_new_tokens=cfg.eval.max_new_tokens or
                            cfg.trainer.max_completion_length, batch_size=cfg.eval.batch_size,
                            samples=cfg.eval.samples, temperature=cfg.eval.temperature or cfg.trainer.temperature,
                            seed=cfg.seed)

    before = held_out(model)
    if before:
        say(f"[tokensel] held-out accuracy before training: {_fmt(before)}")

    # ---- RL ------------------------------------------------------------------------------------------------------
    wandb_run = None
    if main:
        wandb_run = init_wandb(run_dir, cfg.tracking.wandb, cfg.tracking.project, cfg.tracking.entity,
                               run_dir.name, resolved_cfg)
    metrics_path = run_dir / "metrics.jsonl"
    resume_from = last_complete(run_dir / "checkpoints") if cfg.resume == "auto" else None
    if main:
        if resume_from is None:
            metrics_path.unlink(missing_ok=True)
        else:
            truncate_metrics(metrics_path, checkpoint_step(resume_from))
            say(f"[tokensel] resuming from {resume_from}")
    callback = MetricsCallback(metrics_path, wandb_run, resolved.objective.name)
    extra: dict[str, Any] = {}
    if resolved.objective.entry.kind == "distill":
        trainer, extra = distillation_trainer(resolved, model, tokenizer, train_rows, run_dir, callback, held_out)
    elif resolved.objective.entry.kind == "preference":
        trainer, extra = preference_trainer(resolved, model, tokenizer, task, train_rows, run_dir, callback)
    else:
        trainer = grpo_trainer(resolved, model, tokenizer, task, train_rows, run_dir, callback)
    periodic = PeriodicEval(held_out, cfg.eval.every, callback)
    if cfg.eval.enabled and cfg.eval.every > 0:
        trainer.add_callback(periodic)
    if trainer.pop_callback(ProgressCallback) is not None:  # None when tqdm is disabled (non-zero ranks)
        trainer.add_callback(CompactProgress(resolved.objective.name))
    if cfg.trainer.save_steps:
        trainer.add_callback(MarkComplete())
    rl_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    rl_seconds = time.perf_counter() - rl_start - periodic.seconds
    final_dir = run_dir / "final"
    trainer.save_model(str(final_dir))
    if main:
        tokenizer.save_pretrained(str(final_dir))

    after = held_out(trainer.model)
    metric = cfg.eval.metric
    summary = {
        "experiment": cfg.experiment,
        "accuracy_metric": f"{metric} Pass@1" + (f" (mean of {cfg.eval.samples} samples per prompt at T="
                                                  f"{cfg.eval.temperature or cfg.trainer.temperature})"
                                                  if metric == "sampled" else " (greedy decoding)"),
        "accuracy_before": before.get(metric),
        "accuracy_after": after.get(metric),
        "greedy_accuracy_before": before.get("greedy"),
        "greedy_accuracy_after": after.get("greedy"),
        "sampled_accuracy_before": before.get("sampled"),
        "sampled_accuracy_after": after.get("sampled"),
        "held_out_prompts": len(eval_rows),
        "kept_token_fraction": float(np.mean(callback.kept)) if callback.kept else None,
        "mean_reward_first_log": callback.rewards[0] if callback.rewards else None,
        "mean_reward_last_log": callback.rewards[-1] if callback.rewards else None,
        "rl_steps": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "deepspeed_stage": (cfg.deepspeed.config.get("zero_optimization", {}).get("stage")
                            if cfg.deepspeed.enabled and not cfg.deepspeed.config_file else None),
        "rl_seconds": round(rl_seconds, 1),  # training loop only (periodic evaluations excluded)
        "kernels_backend": trainer.kernels_backend,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # whole process (Linux)
        "warmup": warmup_info,
        "resumed_from": None if resume_from is None else str(resume_from),
        **extra,
        "run_dir": str(run_dir),
        "checkpoint": str(final_dir),
        "metrics": str(metrics_path),
        "wandb": None if wandb_run is None else {"id": wandb_run.id, "mode": wandb_run.settings.mode,
                                                  "dir": str(wandb_run.dir)},
    }
    if main:
        write_json(run_dir / "summary.json", summary)
        if wandb_run is not None:
            wandb_run.summary.update({f"eval/{k}": v for k, v in summary.items() if "accuracy_" in k and v is not None})
            wandb_run.summary["kernels/backend"] = summary["kernels_backend"]
            wandb_run.finish()
        print_summary(summary)
    return summary


def peft_config(cfg):
    """A ``peft.LoraConfig`` from ``peft.*``, or None (full fine-tuning)."""
    if not cfg.peft.enabled:
        return None
    from peft import LoraConfig

    p = cfg.peft
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=list(p.target_modules),
                      task_type="CAUSAL_LM")


def grpo_trainer(resolved: Resolved, model, tokenizer, task, train_rows, run_dir: Path, callback):
    cfg = resolved.cfg
    if resolved.objective.config.ref_coef > 0 or cfg.peft.enabled:
        reference_path(model, tokenizer, run_dir)
    return TokenSelectiveGRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[reward_function(cfg, task)],
        args=grpo_args(cfg, resolved.objective, run_dir),
        train_dataset=Dataset.from_list(training_rows(cfg, task, train_rows)),
        callbacks=[callback],
        objective=resolved.objective,
        selection_pass=selection_pass_enabled(cfg, resolved.objective),
        domains=[task.domain_of(r) for r in train_rows],
        sampler=cfg.trainer.sampler,
        peft_config=peft_config(cfg),
    )


def distillation_trainer(resolved: Resolved, model, tokenizer, train_rows, run_dir: Path, callback, held_out):
    """The teacher (built and cached, or loaded), its held-out accuracy, and the TIP distillation trainer."""
    cfg = resolved.cfg
    if cfg.peft.enabled:
        reference_path(model, tokenizer, run_dir)
    teacher_cfg = OmegaConf.to_object(cfg.distill.teacher)
    cache_dir = Path(cfg.warmup.cache_dir or Path(cfg.run.root) / ".cache" / "warmup")
    teacher, info = build_teacher(teacher_cfg, OmegaConf.to_object(cfg.model), tokenizer, model, train_rows,
                                  OmegaConf.to_container(cfg.task, resolve=True), cfg.seed, cache_dir)
    accuracy = held_out(teacher)
    if accuracy and is_main_process():
        print(f"[tokensel] teacher ({count_parameters(teacher) / 1e6:.2f}M params, "
              f"{'cached' if info.get('cached') else info['source']}) held-out accuracy: {_fmt(accuracy)}")
    trainer = TipDistillationTrainer(
        model=model,
        teacher_model=teacher,
        processing_class=tokenizer,
        args=distill_args(cfg, run_dir),
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in train_rows]),
        callbacks=[callback],
        objective=resolved.objective,
        head=cfg.distill.head,
        peft_config=peft_config(cfg),
    )
    return trainer, {"teacher": {**info, "parameters": count_parameters(teacher),
                                 "accuracy": accuracy.get(cfg.eval.metric) if accuracy else None}}


def preference_trainer(resolved: Resolved, model, tokenizer, task, train_rows, run_dir: Path, callback):
    """Pairs (sampled from the warm model, with cDPO weights / T-REG rewards on request, cached; or a dataset), the
    frozen warm model as the reference, and the token-level DPO trainer."""
    cfg = resolved.cfg
    pcfg = OmegaConf.to_object(cfg.preference)
    if pcfg.source == "sampled":
        cache_dir = Path(cfg.warmup.cache_dir or Path(cfg.run.root) / ".cache" / "preference")
        key = cache_key(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.task, resolve=True),
                        OmegaConf.to_object(cfg.warmup), cfg.seed)
        key = cache_key({"warm": key, "tokenizer": tokenizer_fingerprint(tokenizer), "max_new_tokens":
                         cfg.trainer.max_completion_length}, {}, pcfg, cfg.seed)
        pairs, info = cached_preference_rows(key, Path(cache_dir), lambda: build_preference_rows(
            model, tokenizer, task, train_rows, pcfg, cfg.trainer.max_completion_length, cfg.eval.batch_size,
            cfg.seed))
        if info["tokenizer"] != tokenizer_fingerprint(tokenizer):  # token weights index this tokenizer's tokens
            raise ValueError(f"cached preference data {info['path']} was scored with another tokenizer; delete it")
    else:
        pairs, info = load_preference_dataset(pcfg.source), {"source": pcfg.source}
    if is_main_process():
        origin = "cached" if info.get("cached") else info.get("source", "sampled")
        accuracy = f", sample accuracy {info['sample_accuracy']:.2f}" if "sample_accuracy" in info else ""
        print(f"[tokensel] preference pairs: {len(pairs)} ({origin}{accuracy})")
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    trainer = TokenDPOTrainer(
        model=model,
        ref_model=reference,
        args=dpo_args(cfg, resolved.objective, run_dir),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[callback],
        objective=resolved.objective,
    )
    return trainer, {"preference": info}


class PeriodicEval(TrainerCallback):
    """Held-out accuracy every ``every`` RL steps, logged as ``eval/accuracy_<metric>`` with the seconds it took
    (``eval/seconds``, so that RL wall time can be reported without it). The training RNG is left untouched."""

    def __init__(self, held_out, every: int, metrics: MetricsCallback) -> None:
        self.held_out, self.every, self.metrics = held_out, every, metrics
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return  # the final evaluation runs after training anyway
        start = time.perf_counter()
        result = self.held_out(model)
        logs = {f"eval/accuracy_{k}": v for k, v in result.items()}
        logs["eval/seconds"] = time.perf_counter() - start
        self.seconds += logs["eval/seconds"]
        self.metrics.on_log(args, state, control, logs=logs)


def reference_path(model, tokenizer, run_dir: Path) -> None:
    """The pre-adaptation weights need a path: TRL builds a KL term's reference model from
    ``model.config._name_or_path``, and a LoRA adapter records it as its base (``trainer.export`` reloads it). A
    locally built (and warmed-up) model has none, so its weights are written to ``<run>/reference`` first."""
    current = model.config._name_or_path
    if current and Path(current).is_dir() or current and not Path(current).exists() and "/" in current:
        return  # a local directory or a hub id: TRL loads it itself
    target = run_dir / "reference" / f"rank{int(os.environ.get('RANK', '0'))}"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    model.config._name_or_path = str(target)
    model.name_or_path = str(target)  # what PEFT records as an adapter's base_model_name_or_path


def reward_function(cfg, task):
    """The task's verifier, or the label-free majority vote of test-time RL."""
    if cfg.reward.name == "majority_vote":
        return MajorityVoteReward(task, cfg.trainer.num_generations, cfg.reward.leave_one_out)
    return task_reward(task)


def training_rows(cfg, task, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the trainer sees them, each with its domain label. Label-free runs never see the labels: only the
    prompts (and domains) reach the trainer; held-out evaluation still scores against the labels."""
    if cfg.reward.name == "majority_vote":
        return [{"prompt": r["prompt"], "domain": task.domain_of(r)} for r in rows]
    return [{**r, "domain": task.domain_of(r)} for r in rows]


# trainer.* keys that are GRPOConfig fields of the same name and meaning
GRPO_PASSTHROUGH = ("ds3_gather_for_generation", "use_vllm", "vllm_mode", "vllm_server_base_url",
                    "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size")


def grpo_args(cfg, objective, run_dir: Path):
    from trl import GRPOConfig

    t = cfg.trainer
    c = objective.config
    return GRPOConfig(
        **common_args(cfg, run_dir),
        steps_per_generation=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        num_iterations=t.num_iterations,
        # TRL computes ref log-probs and loads a reference model only when beta > 0.
        beta=float(c.ref_coef),
        loss_type=getattr(c, "loss_type", "dapo"),
        epsilon=float(getattr(c, "epsilon_low", 0.2)),
        epsilon_high=float(getattr(c, "epsilon_high", 0.2)),
        **{key: t[key] for key in GRPO_PASSTHROUGH},
    )


def common_args(cfg, run_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by the RL and the distillation trainers."""
    t = cfg.trainer
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        optim=t.optim,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.prompts_per_step * t.num_generations // (world_size() * t.gradient_accumulation_steps),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        top_p=t.top_p,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[],
        seed=cfg.seed,
        use_cpu=cfg.run.device == "cpu" or not torch.cuda.is_available(),
        bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
        log_completions=False,
        disable_tqdm=not is_main_process(),
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(cfg),
    )


def distill_args(cfg, run_dir: Path):
    from trl import DistillationConfig

    # beta 1 = reverse KL (TIP's loss); dropout off so the scoring and loss passes see one distribution.
    return DistillationConfig(**common_args(cfg, run_dir), beta=1.0, disable_dropout=True)


def dpo_args(cfg, objective, run_dir: Path):
    from trl import DPOConfig

    keep = ("output_dir", "max_steps", "learning_rate", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
            "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
            "save_strategy", "save_steps", "save_total_limit", "report_to", "seed", "use_cpu", "bf16", "disable_tqdm",
            "dataloader_num_workers", "deepspeed")
    common = {k: v for k, v in common_args(cfg, run_dir).items() if k in keep}
    # max_length: the longest prompt + completion the model handles; gradient checkpointing buys nothing here
    return DPOConfig(**common, beta=float(objective.config.beta), loss_type=["sigmoid"], gradient_checkpointing=False,
                     max_length=cfg.model.tiny.max_position_embeddings if not cfg.model.name_or_path else 1024)


def _check_lengths(cfg, tokenizer, rows) -> None:
    if cfg.model.name_or_path:
        return
    longest = max(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
    need = longest + cfg.trainer.max_completion_length
    if need > cfg.model.tiny.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({longest} tokens) + trainer.max_completion_length ({cfg.trainer.max_completion_length}) "
            f"= {need} exceeds model.tiny.max_position_embeddings ({cfg.model.tiny.max_position_embeddings})"
        )


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())


def print_summary(s: dict[str, Any]) -> None:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    kept = s["kept_token_fraction"]
    lines = [
        "",
        f"== tokensel summary: {s['experiment']} ==",
        f"held-out accuracy   before {pct(s['accuracy_before'])}  ->  after {pct(s['accuracy_after'])}"
        f"  [{s['accuracy_metric']}, {s['held_out_prompts']} prompts]",
        f"greedy accuracy     before {pct(s['greedy_accuracy_before'])}  ->  after "
        f"{pct(s['greedy_accuracy_after'])}",
        f"kept-token fraction {'n/a' if kept is None else f'{kept:.3f}'}  ({s['rl_steps']} training steps)",
        *([f"teacher accuracy    {pct(s['teacher']['accuracy'])}"] if "teacher" in s else []),
        f"wall time           {s['wall_seconds']:.0f} s",
        f"run directory       {s['run_dir']}  (summary.json, metrics.jsonl, config.yaml)",
        f"checkpoint          {s['checkpoint']}",
        f"W&B run             {'disabled' if s['wandb'] is None else s['wandb']['mode'] + ' ' + s['wandb']['dir']}",
    ]
    print("\n".join(lines))
