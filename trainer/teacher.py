"""The teacher of on-policy distillation: a hub id or local path, or (the offline default) a larger tiny model
trained longer on the task's demonstrations and cached like the student's warm-up."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .modeling import build_tiny, load_pretrained
from .schema import ModelConfig, TeacherConfig, WarmupConfig
from .tasks import Row
from .warmup import cache_key, warm_start


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_model=None, teacher_model=None) -> None:
    """Distillation compares full next-token distributions: both sides must index one vocabulary."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"student and teacher tokenizers differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}); first "
            f"differing (token, id) pairs: {differ}. On-policy distillation needs one shared vocabulary: pick a "
            "teacher from the student's model family (cross-tokenizer distillation is not supported)"
        )
    if student_model is not None and teacher_model is not None:
        vs = student_model.config.get_text_config().vocab_size
        vt = teacher_model.config.get_text_config().vocab_size
        if vs != vt:
            raise ValueError(f"student lm_head has {vs} rows, teacher {vt}: pad or slice both heads to the tokenizer's "
                             f"{len(s_vocab)} tokens before distilling")


def build_teacher(teacher: TeacherConfig, model_cfg: ModelConfig, student_tokenizer, student_model,
                  train_rows: list[Row], task_cfg: dict[str, Any], seed: int, cache_dir: Path):
    """``(teacher_model, info)``; the local default trains once and is then loaded from ``cache_dir``."""
    if teacher.name_or_path:
        model, tokenizer = load_pretrained(teacher.name_or_path, model_cfg)
        check_same_vocabulary(student_tokenizer, tokenizer, student_model, model)
        return model.eval(), {"source": teacher.name_or_path, "cached": None}
    cfg = ModelConfig(tiny=teacher.tiny, dtype=model_cfg.dtype, attn_implementation=model_cfg.attn_implementation)
    model, tokenizer = build_tiny(cfg, seed + 1)
    check_same_vocabulary(student_tokenizer, tokenizer, student_model, model)
    rows = [{**r, "solution": r["answer"]} for r in train_rows] if teacher.clean_demos else train_rows
    warm = WarmupConfig(steps=teacher.warmup_steps, learning_rate=teacher.warmup_learning_rate)
    key = cache_key({"teacher": asdict(teacher), "dtype": cfg.dtype}, task_cfg, warm, seed)
    model, info = warm_start(model, tokenizer, rows, warm, seed, cache_dir, key)
    return model.eval(), {"source": "tiny (local)", **info}
