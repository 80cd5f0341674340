"""``python -m trainer.export``: a LoRA run merged and reloaded with ``AutoModelForCausalLM`` reproduces the training
model's logits; an empty adapter and a merged model equal to its base are refused; the Hub push runs as a dry run
that lists exactly what would be uploaded (no network)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.__main__ import main as train
from trainer.export import ExportError, export
from trainer.export import main as export_main
from trainer.modeling import build_tiny
from trainer.schema import ModelConfig

SMALL = ["warmup.steps=30", "trainer.max_steps=3", "trainer.prompts_per_step=4", "trainer.num_generations=4",
         "task.train_size=64", "task.eval_size=16", "eval.batch_size=16", "tracking.wandb=disabled"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    assert train(["+experiment=quickstart", f"run.root={root}", *SMALL, "peft.enabled=true",
                  "trainer.learning_rate=1e-2"]) == 0
    return root / "quickstart"


def test_lora_run_merges_reloads_and_dry_runs_the_push(lora_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("a dry run must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    out = tmp_path / "export"
    assert export_main([f"run={lora_run}", "merge_lora=true", f"out={out}", "push_to_hub=org/tiny-grpo",
                        "dry_run=true"]) == 0
    printed = capsys.readouterr().out
    assert "would upload model.safetensors" in printed and "to org/tiny-grpo" in printed
    assert "would upload README.md" in printed
    report = json.loads(printed[printed.index("{"):])
    assert report["merged"] and report["max_logit_difference"] <= 1e-4

    # independent check: the stock Auto class reproduces the adapter model's logits
    from peft import PeftModel

    base_path = json.loads((lora_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), lora_run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["47+38=", "9+9="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (trained(**enc).logits - merged(**enc).logits).abs().max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(base_path)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in merged.state_dict().items())
    card = (out / "README.md").read_text()
    assert "quickstart" in card and "grpo" in card and "LoRA merged" in card


def fake_run(tmp_path, adapter_update):
    """A run directory whose final/ holds a LoRA adapter, edited by ``adapter_update(peft_model)``."""
    from peft import LoraConfig, get_peft_model

    base, tok = build_tiny(ModelConfig(), seed=0)
    base_dir = tmp_path / "reference"
    base.save_pretrained(base_dir)
    base.name_or_path = str(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter_update(model)
    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    (tmp_path / "summary.json").write_text(json.dumps({"experiment": "x", "rl_steps": 0}))
    (tmp_path / "config.yaml").write_text("objective: {name: grpo}\n")
    return tmp_path


def test_empty_adapter_is_refused(tmp_path):
    run = fake_run(tmp_path, lambda m: None)  # lora_B stays at its zero initialisation
    with pytest.raises(ExportError, match="empty adapter"):
        export(str(run), merge_lora=True)


def test_merged_model_equal_to_its_base_is_refused(tmp_path):
    def zero_update(model):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.5)  # B non-zero ...
                if "lora_A" in n:
                    p.zero_()  # ... but A zero: B·A = 0, the merge changes nothing

    run = fake_run(tmp_path, zero_update)
    with pytest.raises(ExportError, match="identical to its base"):
        export(str(run), merge_lora=True)


def test_bad_arguments_and_unfinished_runs_are_named(tmp_path, capsys):
    assert export_main(["merge_lora=yes", f"run={tmp_path}"]) == 2
    assert "merge_lora must be true or false" in capsys.readouterr().err
    assert export_main([f"run={tmp_path}"]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert export_main(["colour=blue"]) == 2
