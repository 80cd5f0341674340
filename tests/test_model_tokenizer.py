"""The offline default: local character tokenizer and tiny model; a saved directory loads through the same code."""

import torch
from transformers import AutoTokenizer

from trainer.modeling import build_model, count_parameters
from trainer.schema import ModelConfig
from trainer.tokenizer import build_char_tokenizer


def test_char_tokenizer_roundtrip_and_reload(tmp_path):
    tok = build_char_tokenizer()
    text = "Question: 12+345=? #### 357"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok("é")["input_ids"] == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_tiny_model_is_deterministic_and_small():
    cfg = ModelConfig()
    a, tok = build_model(cfg, seed=0)
    b, _ = build_model(cfg, seed=0)
    assert count_parameters(a) < 2_000_000
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.config.vocab_size == len(tok)


def test_llama_architecture_builds():
    cfg = ModelConfig()
    cfg.tiny.architecture = "llama"
    model, _ = build_model(cfg, seed=0)
    assert model.config.model_type == "llama"


def test_saved_directory_loads_through_same_path(tmp_path):
    model, tok = build_model(ModelConfig(), seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = build_model(ModelConfig(name_or_path=str(tmp_path)), seed=123)
    ids = tok("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok2.padding_side == "left"
