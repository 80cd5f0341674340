"""Compose and validate the configuration before anything heavy is built.

``compose(argv)`` returns a validated config or raises :class:`ConfigError` listing *every* problem at once,
each with the key, the reason and the closest valid keys. Group choices (``+experiment=quickstart``,
``objective=grpo``) go through Hydra's defaults list; value overrides (``objective.keep=0.2``) are applied here so
that errors can be reported well.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

import objectives

from .schema import register
from .tasks import task_config_class

CONFIG_DIR = Path(os.environ.get("TOKENSEL_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
OPEN_NODES = ("objective", "task")  # validated against the registered component's dataclass


class ConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Resolved:
    """The validated configuration: the typed tree plus the built component configs."""

    cfg: DictConfig
    objective: objectives.Objective
    task_config: Any


def groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def experiments() -> dict[str, str]:
    """Experiment name -> its one-line description."""
    out = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        node = OmegaConf.load(path)
        out[path.stem] = str(node.get("description", ""))
    return out


def _suggest(key: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else f" (valid: {', '.join(candidates)})"


def _children(cfg: DictConfig, path: str) -> list[str]:
    node = OmegaConf.select(cfg, path) if path else cfg
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def split_overrides(args: list[str]) -> tuple[list[str], list[Any]]:
    """Hydra group selections (kept as strings) and value overrides (parsed)."""
    parsed = OverridesParser.create().parse_overrides(args)
    group_names = set(groups())
    group_args, values = [], []
    for arg, o in zip(args, parsed, strict=True):
        key = o.key_or_group
        if key in group_names:
            group_args.append(arg if o.is_add() or key != "experiment" else "+" + arg)
        else:
            values.append(o)
    return group_args, values


def _apply(cfg: DictConfig, override: Any, problems: list[str]) -> None:
    key, value = override.key_or_group, override.value()
    parent, _, leaf = key.rpartition(".")
    top = key.split(".")[0]
    try:
        if top in OPEN_NODES and "." in key:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            return
        if parent and OmegaConf.select(cfg, parent) is None:
            raise KeyError(parent)
        if leaf not in _children(cfg, parent):
            raise KeyError(leaf)
        OmegaConf.update(cfg, key, value, merge=True)
    except KeyError:
        missing = leaf if parent and OmegaConf.select(cfg, parent) is not None else key.split(".")[0]
        where = parent if missing == leaf else ""
        prefix = f"{where}." if where else ""
        problems.append(f"{key}: unknown key{_suggest(missing, _children(cfg, where), prefix)}")
    except OmegaConfBaseException as e:
        problems.append(f"{key}: {_reason(e, value)}")


def _reason(e: OmegaConfBaseException, value: Any) -> str:
    msg = str(e).split("\n")[0]
    return f"invalid value {value!r} ({type(value).__name__}): {msg}"


def _check_component(node: dict[str, Any], where: str, name: str, cls: type, problems: list[str]) -> Any:
    """Unknown keys, types and the dataclass's own checks of one component node; the config object or None."""
    valid = [f.name for f in fields(cls)]
    before = len(problems)
    for k in node:
        if k not in valid:
            problems.append(f"{where}.{k}: unknown key for {where} {name!r}{_suggest(k, valid, where + '.')}")
    known = {k: v for k, v in node.items() if k in valid}
    typed = OmegaConf.structured(cls)
    for k, v in known.items():
        try:
            OmegaConf.update(typed, k, v, merge=True)
        except OmegaConfBaseException as e:
            problems.append(f"{where}.{k}: {_reason(e, v)}")
    if len(problems) > before:
        return None
    try:
        return cls(**OmegaConf.to_container(typed, resolve=True))
    except (ValueError, TypeError) as e:
        problems.append(f"{where}: {e}")
        return None


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def _backend_checks(cfg: DictConfig, kind: str | None, problems: list[str]) -> None:
    """Attention and generation backends that are requested but cannot run here fail now, by name."""
    import importlib.util

    import torch

    attn = cfg.model.attn_implementation
    cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    if attn not in ATTENTION:
        problems.append(f"model.attn_implementation: unknown {attn!r}{_suggest(attn, list(ATTENTION))}")
    elif attn in FLASH_PACKAGES:
        package = FLASH_PACKAGES[attn]
        if importlib.util.find_spec(package) is None:
            problems.append(f"model.attn_implementation: {attn} needs the {package} package (pip install flash-attn "
                            "--no-build-isolation, on a CUDA machine); it is not installed. Use sdpa.")
        elif not cuda:
            problems.append(f"model.attn_implementation: {attn} runs on a CUDA GPU only (run.device="
                            f"{cfg.run.device}, CUDA available: {torch.cuda.is_available()}). Use sdpa.")
    t = cfg.trainer
    if not t.use_vllm:
        return
    if kind in ("distill", "preference"):
        problems.append(f"trainer.use_vllm: vLLM rollouts are wired for the RL (GRPO) trainer, not for {kind}")
    if t.vllm_mode not in ("colocate", "server"):
        problems.append(f"trainer.vllm_mode: must be colocate or server, got {t.vllm_mode!r}")
    if importlib.util.find_spec("vllm") is None:
        problems.append("trainer.use_vllm: the vllm package is not installed (pip install vllm, on a CUDA machine)")
    elif t.vllm_mode == "colocate" and not cuda:
        problems.append("trainer.use_vllm: colocated vLLM needs a CUDA GPU")
    if t.sampler == "hashed":
        problems.append("trainer.sampler: hashed samples inside transformers' generate and cannot drive vLLM")


def _cross_checks(cfg: DictConfig, objective: objectives.Objective | None, problems: list[str]) -> None:
    t = cfg.trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = None if objective is None else objective.entry.kind
    if kind == "distill":
        _distill_checks(cfg, problems)
    elif kind == "preference":
        _preference_checks(cfg, objective, problems)
    elif t.num_generations < 2:
        problems.append(f"trainer.num_generations: GRPO needs at least 2 completions per prompt, got {t.num_generations}")
    rows = t.prompts_per_step * t.num_generations
    if rows % (world * t.gradient_accumulation_steps):
        problems.append(
            f"trainer.prompts_per_step: {t.prompts_per_step} prompts x {t.num_generations} generations = {rows} rows "
            f"do not split into world size {world} x gradient_accumulation_steps {t.gradient_accumulation_steps}"
        )
    if t.selection_pass not in ("auto", "always", "never"):
        problems.append(f"trainer.selection_pass: must be auto, always or never, got {t.selection_pass!r}")
    for name in ("max_steps", "max_completion_length", "gradient_accumulation_steps", "prompts_per_step"):
        if t[name] < 1:
            problems.append(f"trainer.{name}: must be >= 1, got {t[name]}")
    if cfg.eval.metric not in ("sampled", "greedy"):
        problems.append(f"eval.metric: must be sampled or greedy, got {cfg.eval.metric!r}")
    if cfg.eval.metric == "sampled" and cfg.eval.samples < 1:
        problems.append("eval.samples: the sampled metric needs eval.samples >= 1 (or set eval.metric=greedy)")
    if cfg.peft.enabled and "lm_head" in cfg.peft.target_modules:
        problems.append("peft.target_modules: lm_head cannot take an adapter (the kernels and TRL's distillation loss "
                        "read lm_head.weight directly, so the adapter would never train)")
    if cfg.peft.enabled and objective is not None and objective.entry.kind == "preference":
        problems.append("peft.enabled: token-level DPO needs an explicit reference model; LoRA with the "
                        "adapter-disabled reference is not supported yet")
    if cfg.resume not in ("never", "auto"):
        problems.append(f"resume: must be never or auto, got {cfg.resume!r}")
    from transformers.training_args import OptimizerNames

    optimizers = [o.value for o in OptimizerNames]
    if t.optim not in optimizers:
        problems.append(f"trainer.optim: unknown optimizer {t.optim!r}{_suggest(t.optim, optimizers)}")
    _backend_checks(cfg, kind, problems)
    if cfg.trainer.sampler not in ("torch", "hashed"):
        problems.append(f"trainer.sampler: must be torch or hashed, got {cfg.trainer.sampler!r}")
    elif cfg.trainer.sampler == "hashed" and kind in ("distill", "preference"):
        problems.append(f"trainer.sampler: hashed is implemented for the RL (GRPO) trainer, not for {kind} objectives")
    if cfg.deepspeed.enabled and kind == "distill":
        problems.append("deepspeed.enabled: DeepSpeed runs the RL (GRPO) and token-level DPO trainers; the "
                        "distillation trainer reads the LM-head weights directly, which ZeRO partitions (use "
                        "torchrun/DDP for it)")
    if cfg.deepspeed.config_file and not Path(cfg.deepspeed.config_file).is_file():
        problems.append(f"deepspeed.config_file: no such file {cfg.deepspeed.config_file!r}")
    if cfg.trainer.save_total_limit is not None and cfg.trainer.save_total_limit < 2:
        problems.append(f"trainer.save_total_limit: must be >= 2 or null, got {cfg.trainer.save_total_limit} (with one "
                        "checkpoint kept, a kill while the next is written leaves none complete)")
    if cfg.tracking.wandb not in ("auto", "online", "offline", "disabled"):
        problems.append(f"tracking.wandb: must be auto, online, offline or disabled, got {cfg.tracking.wandb!r}")
    if cfg.model.name_or_path is None and cfg.model.tiny.architecture not in ("qwen2", "llama"):
        problems.append(f"model.tiny.architecture: must be qwen2 or llama, got {cfg.model.tiny.architecture!r}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"model.dtype: must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.reward.name not in ("verifier", "majority_vote"):
        problems.append(f"reward.name: must be verifier or majority_vote, got {cfg.reward.name!r}")
    if objective is not None:
        if objective.needs_step_selection(t.num_iterations) and t.selection_pass == "never":
            problems.append(
                f"trainer.selection_pass: 'never' cannot serve objective {objective.name!r} with this configuration "
                f"(num_iterations={t.num_iterations}): its selection must be decided once per step on the whole "
                "step (set selection_pass=auto)"
            )
        if objective.entry.select is None and t.selection_pass == "always":
            problems.append(f"trainer.selection_pass: objective {objective.name!r} has no step-level selection")


def _distill_checks(cfg: DictConfig, problems: list[str]) -> None:
    """On-policy distillation (TRL's DistillationTrainer): one completion per prompt row, one update per rollout."""
    t = cfg.trainer
    if t.num_generations != 1:
        problems.append(f"trainer.num_generations: on-policy distillation samples one completion per prompt row, got "
                        f"{t.num_generations} (use the distill_cpu trainer group; repeat prompts in the data for more)")
    if t.num_iterations != 1:
        problems.append(f"trainer.num_iterations: TRL's DistillationTrainer updates once per rollout, got "
                        f"{t.num_iterations}")
    if cfg.reward.name != "verifier":
        problems.append("reward.name: distillation has no reward; leave reward.name=verifier")
    if cfg.distill.head not in ("tokensel", "trl"):
        problems.append(f"distill.head: must be tokensel or trl, got {cfg.distill.head!r}")


def _preference_checks(cfg: DictConfig, objective, problems: list[str]) -> None:
    """Token-level DPO on preference pairs (TRL's DPOTrainer): one row per pair, data from sampling or a file."""
    p, t = cfg.preference, cfg.trainer
    if t.num_generations != 1:
        problems.append(f"trainer.num_generations: preference training takes one row per pair, got {t.num_generations} "
                        "(use the dpo_cpu trainer group)")
    if p.token_weights not in ("none", "cdpo"):
        problems.append(f"preference.token_weights: must be none or cdpo, got {p.token_weights!r}")
    if p.token_rewards not in ("none", "treg"):
        problems.append(f"preference.token_rewards: must be none or treg, got {p.token_rewards!r}")
    settings = objective.config.resolved()
    if p.source == "sampled" and settings["treg_alpha"] > 0 and p.token_rewards != "treg":
        problems.append("preference.token_rewards: T-REG (treg_alpha > 0) needs token rewards; set "
                        "preference.token_rewards=treg")
    if p.source == "sampled" and objective.config.preset.startswith("cdpo") and p.token_weights != "cdpo":
        problems.append("preference.token_weights: the cdpo presets need critical-token weights; set "
                        "preference.token_weights=cdpo")
    if p.samples_per_prompt < 2 and p.source == "sampled":
        problems.append("preference.samples_per_prompt: pairs need at least 2 samples per prompt")


def selection_pass_enabled(cfg: DictConfig, objective: objectives.Objective) -> bool:
    """``trainer.selection_pass``: always / never, or auto = exactly when the objective's selection requires it."""
    setting = cfg.trainer.selection_pass
    if setting != "auto":
        return setting == "always"
    return objective.needs_step_selection(cfg.trainer.num_iterations)


def compose(args: list[str]) -> Resolved:
    """Compose ``configs/config.yaml`` with ``args`` (Hydra override syntax) and validate everything."""
    register()
    group_args, values = split_overrides(args)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=group_args)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError([_hydra_problem(e)]) from None
    problems: list[str] = []
    for o in values:
        _apply(cfg, o, problems)

    obj_node = OmegaConf.to_container(cfg.objective, resolve=True)
    obj_name = obj_node.pop("name", None)
    objective = None
    if obj_name not in objectives.REGISTRY:
        problems.append(f"objective.name: unknown objective {obj_name!r}{_suggest(str(obj_name), objectives.names())}")
    else:
        entry = objectives.REGISTRY[obj_name]
        filled = {"max_completion_length": cfg.trainer.max_completion_length,
                  "num_generations": cfg.trainer.num_generations}
        for key, value in filled.items():  # trainer facts the objective needs, unless set explicitly
            if key in [f.name for f in fields(entry.config)]:
                obj_node.setdefault(key, value)
        built = _check_component(obj_node, "objective", obj_name, entry.config, problems)
        if built is not None:
            objective = objectives.Objective(name=obj_name, config=built, entry=entry)

    task_node = OmegaConf.to_container(cfg.task, resolve=True)
    task_config = None
    try:
        task_cls = task_config_class(str(task_node.get("name")))
    except KeyError as e:
        problems.append(f"task.name: {e.args[0]}")
    else:
        task_config = _check_component(task_node, "task", str(task_node.get("name")), task_cls, problems)

    _cross_checks(cfg, objective, problems)
    if problems:
        raise ConfigError(problems)
    return Resolved(cfg=cfg, objective=objective, task_config=task_config)


def _hydra_problem(e: Exception) -> str:
    msg = str(e).split("\n")[0]
    if "experiment" in msg and "Could not find" in msg:
        return f"experiment: {msg}. Available: {', '.join(experiments())}"
    for group in groups():
        if f"'{group}/" in msg or f"{group}=" in msg:
            options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            return f"{group}: {msg}. Options: {', '.join(options)}"
    return msg


