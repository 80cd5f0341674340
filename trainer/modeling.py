"""Models: a tiny Qwen2/Llama built from a config (the offline default) or any causal LM by hub id / local path.

Both paths return ``(model, tokenizer)`` through the same code, so the quickstart and a real run differ only in
``model.name_or_path``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, Qwen2Config

from .schema import ModelConfig
from .tokenizer import build_char_tokenizer

ARCHITECTURES = {"qwen2": Qwen2Config, "llama": LlamaConfig}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny(cfg: ModelConfig, seed: int) -> tuple[PreTrainedModel, object]:
    """A small randomly initialised causal LM and its local character tokenizer."""
    tokenizer = build_char_tokenizer()
    t = cfg.tiny
    config = ARCHITECTURES[t.architecture](
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)
    return model, tokenizer


def load_pretrained(path: str | Path, cfg: ModelConfig) -> tuple[PreTrainedModel, object]:
    """A causal LM and its tokenizer from a hub id or a local directory."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_model(cfg: ModelConfig, seed: int) -> tuple[PreTrainedModel, object]:
    """``model.name_or_path`` set -> load it; otherwise build the tiny model."""
    if cfg.name_or_path:
        return load_pretrained(cfg.name_or_path, cfg)
    return build_tiny(cfg, seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
