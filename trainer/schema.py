"""Typed configuration schema, registered in Hydra's ConfigStore and linked from ``configs/config.yaml``.

Every field carries a help string (``metadata["help"]``) with the source of its default. The ``objective`` and
``task`` nodes are open here and validated against the registered component's own dataclass
(``objectives.REGISTRY`` / ``trainer.tasks.TASKS``), so a component's config lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def F(default: Any, help: str, **kw: Any) -> Any:  # noqa: N802 - reads as a field declaration
    """A dataclass field with a help string."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TinyModelConfig:
    architecture: str = F("qwen2", "qwen2 | llama: transformers architecture of the locally built model")
    hidden_size: int = F(128, "width of the tiny model")
    intermediate_size: int = F(384, "MLP width")
    num_layers: int = F(4, "decoder layers")
    num_heads: int = F(4, "attention heads (= key/value heads)")
    max_position_embeddings: int = F(128, "longest prompt + completion the tiny model handles")


@dataclass
class ModelConfig:
    name_or_path: str | None = F(None, "HF hub id or local directory; null builds the tiny model locally (offline)")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = F("float32", "float32 | bfloat16 | float16 (float32 on CPU)")
    attn_implementation: str = F("sdpa", "eager | sdpa | flash_attention_2 | flash_attention_3 (flash-attn on a "
                                 "CUDA GPU; requesting it without one is an error, never a silent fallback)")
    trust_remote_code: bool = F(False, "passed to from_pretrained")


@dataclass
class WarmupConfig:
    enabled: bool = F(True, "supervised warm-up on the task's solutions before RL (cached by content hash)")
    steps: int = F(300, "optimizer steps of the warm-up")
    batch_size: int = F(64, "sequences per warm-up step")
    learning_rate: float = F(3e-3, "AdamW learning rate of the warm-up (tiny model from scratch)")
    cache: bool = F(True, "reuse a warm-up with the same model, task and settings")
    cache_dir: str | None = F(None, "where cached warm-ups live; null -> <run.root>/.cache/warmup")


@dataclass
class GRPOTrainerConfig:
    max_steps: int = F(100, "optimizer steps of RL")
    learning_rate: float = F(1e-6, "AdamW learning rate; TRL GRPOConfig default 1e-6")
    optim: str = F("adamw_torch", "transformers optimizer name (adamw_torch, adamw_torch_fused, sgd, adafactor, ...)")
    lr_scheduler_type: str = F("constant", "transformers scheduler name")
    warmup_steps: float = F(0.0, "linear LR warm-up: steps (>= 1) or a fraction of max_steps (< 1)")
    weight_decay: float = F(0.0, "AdamW weight decay")
    max_grad_norm: float = F(1.0, "gradient clipping; TRL default 1.0")
    prompts_per_step: int = F(16, "distinct prompts per optimizer step (all ranks, all micro-batches)")
    num_generations: int = F(8, "completions per prompt (the GRPO group size G); TRL default 8")
    gradient_accumulation_steps: int = F(1, "micro-batches per optimizer step per rank")
    max_completion_length: int = F(16, "T_max: longest completion generated")
    temperature: float = F(1.0, "sampling temperature of rollouts (entropies use the same temperature)")
    top_p: float = F(1.0, "nucleus sampling of rollouts")
    sampler: str = F("torch", "torch | hashed: hashed draws each rollout's Gumbel noise from (seed, step, rollout id, "
                     "position), so one process and N ranks sample the same completions (GRPO, transformers generate)")
    use_vllm: bool = F(False, "generate rollouts with vLLM (TRL's integration; needs vllm and a CUDA GPU)")
    vllm_mode: str = F("colocate", "colocate (vLLM inside each training process) | server (trl vllm-serve)")
    vllm_server_base_url: str | None = F(None, "server mode: the URL of `trl vllm-serve`, e.g. http://10.0.0.2:8000")
    vllm_gpu_memory_utilization: float = F(0.3, "colocate mode: the GPU memory fraction vLLM may take")
    vllm_tensor_parallel_size: int = F(1, "colocate mode: tensor-parallel degree of vLLM")
    ds3_gather_for_generation: bool = F(True, "ZeRO-3: gather the full weights for rollouts (fast); false keeps "
                                        "them sharded and generates with the ranks in lock-step (for models "
                                        "too large for one device)")
    num_iterations: int = F(1, "PPO epochs per generation batch (TRL's mu)")
    logging_steps: int = F(5, "log every N optimizer steps")
    save_steps: int = F(0, "checkpoint every N steps; 0 = only at the end")
    save_total_limit: int | None = F(2, "checkpoints kept on disk (the newest); at least 2, so that a kill while the "
                                     "newest is written still leaves a complete one; null keeps all")
    selection_pass: str = F(
        "auto",
        "auto | always | never: compute the step's token selection from a no-grad statistics pass at rollout "
        "time (needed for per_group / global_batch scopes); auto = when the scope needs it",
    )


@dataclass
class EvalConfig:
    enabled: bool = F(True, "held-out accuracy before and after RL")
    batch_size: int = F(256, "prompts per generation batch during evaluation")
    metric: str = F("sampled", "sampled | greedy: which Pass@1 estimate the summary reports as accuracy")
    samples: int = F(4, "completions per held-out prompt for the sampled estimate (avg@k); 0 = greedy only")
    temperature: float | None = F(None, "sampling temperature of the sampled estimate; null = trainer.temperature")
    max_new_tokens: int | None = F(None, "null -> trainer.max_completion_length")
    every: int = F(0, "also evaluate every N RL steps (eval/accuracy_* curves in metrics.jsonl); 0 = before and after")


@dataclass
class RewardConfig:
    name: str = F("verifier", "verifier: the task's checker against the labels | majority_vote: label-free "
                  "test-time RL (TTRL), the group's most common answer is the pseudo-label")
    leave_one_out: bool = F(False, "majority_vote: score each completion against the vote of the other G - 1")


def _teacher_tiny() -> TinyModelConfig:
    return TinyModelConfig(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4)


@dataclass
class TeacherConfig:
    name_or_path: str | None = F(None, "HF hub id or local directory of the teacher; null builds a larger tiny model "
                                 "locally and trains it on the task's demonstrations (cached)")
    tiny: TinyModelConfig = field(default_factory=_teacher_tiny)
    warmup_steps: int = F(1500, "supervised steps of the locally built teacher (longer than the student's warm-up)")
    warmup_learning_rate: float = F(1e-3, "AdamW learning rate of the teacher's training")
    clean_demos: bool = F(True, "train the local teacher on the true answers (the task's noisy demonstrations, if "
                          "any, are for the student)")


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    head: str = F("tokensel", "tokensel: the loss pass projects and back-propagates only the kept tokens "
                  "(kernels.token_stats) | trl: TRL's own _compute_loss on the folded mask (its chunked kernel)")


@dataclass
class PreferenceConfig:
    source: str = F("sampled", "sampled: pairs sampled from the warm model on the task (offline default) | a local "
                    ".jsonl/.json/.parquet file or a hub id[:config] with prompt / chosen / rejected (+ weight columns)")
    prompts: int = F(1024, "training prompts sampled for pairs")
    samples_per_prompt: int = F(8, "completions per prompt (the cDPO authors draw 64)")
    temperature: float = F(1.0, "sampling temperature of the pairs")
    token_weights: str = F("none", "none | cdpo: critical-token weights 1 - s_t on rejected tokens from two LoRA CE "
                           "models (positive / negative)")
    cdpo_lambda: float = F(1.0, "λ of s_t = softmax((1+λ)z_pos − λz_neg)[y_t] (authors' code)")
    ce_lora_r: int = F(8, "LoRA rank of the CE models (MLP projections; authors' code: 8)")
    ce_steps: int = F(200, "supervised steps of each CE model")
    ce_learning_rate: float = F(3e-3, "learning rate of the CE models (tiny model; the authors use 3e-4)")
    ce_batch_size: int = F(32, "sequences per CE step")
    token_rewards: str = F("none", "none | treg: T-REG token rewards from the reference model under the prompt "
                           "rewritten to better / worse")
    treg_better_prefix: str = F("12+34=46\n", "text put before the prompt for the 'better' rewrite (a solved example)")
    treg_worse_prefix: str = F("12+34=36\n", "text put before the prompt for the 'worse' rewrite (a wrong example)")


@dataclass
class PeftSettings:
    enabled: bool = F(False, "train a LoRA adapter instead of every weight (the base stays frozen)")
    r: int = F(16, "LoRA rank")
    alpha: int = F(32, "LoRA alpha (scale alpha / r)")
    dropout: float = F(0.0, "LoRA dropout (0: the selection pass and the loss pass see one distribution)")
    target_modules: list[str] = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "modules that get an adapter (never lm_head: the kernels read its weight)")


@dataclass
class DeepSpeedSettings:
    enabled: bool = F(False, "run the trainer under DeepSpeed (launch with torchrun, deepspeed or accelerate)")
    config_file: str | None = F(None, "a DeepSpeed JSON file, used instead of `config`")
    config: dict[str, Any] = F({}, "the DeepSpeed config; presets: configs/deepspeed/ (deepspeed=zero2|zero3|...)")


@dataclass
class TrackingConfig:
    wandb: str = F("auto", "auto | online | offline | disabled: auto is online with an API key, else offline")
    project: str = F("tokensel", "W&B project")
    entity: str | None = F(None, "W&B entity")


@dataclass
class RunConfig:
    name: str | None = F(None, "run name; null -> the launcher's job id, else the experiment name")
    root: str = F("runs", "directory holding run directories")
    device: str = F("auto", "auto | cpu | cuda")
    threads: int | None = F(None, "torch CPU threads; null = torch default")


@dataclass
class TokenselConfig:
    experiment: str = F("", "experiment name (set by the experiment file)")
    description: str = F("", "one line on what the experiment shows")
    seed: int = F(0, "seed of model init, data, warm-up and sampling")
    resume: str = F("never", "never | auto: continue from the last complete checkpoint in the run directory (needs "
                    "trainer.save_steps > 0); the run's W&B id and metrics.jsonl continue too")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = F({"name": "arithmetic"}, "task node, validated against the task's own dataclass")
    objective: Any = F({"name": "grpo"}, "objective node, validated against the objective's own dataclass")
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    trainer: GRPOTrainerConfig = field(default_factory=GRPOTrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register() -> None:
    ConfigStore.instance().store(name="tokensel_schema", node=TokenselConfig)
