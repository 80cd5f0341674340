"""``python -m trainer.export run=<run dir> [merge_lora=true] [out=<dir>] [push_to_hub=org/name] [dry_run=true]``

Turns a finished run into a model another person can load:

1. loads ``<run>/final`` — full weights, or a LoRA adapter on its base (``<run>/reference/...`` for locally built
   models, a hub id or path otherwise); an adapter whose weights never left their initialisation (every ``lora_B``
   zero) is refused;
2. with ``merge_lora=true`` merges the adapter into the base and refuses a "merged" model equal to its base;
3. writes the model, the tokenizer and a model card (experiment, objective, data, measured accuracy, config) to
   ``out`` (default ``<run>/export``);
4. reloads the export with ``AutoModelForCausalLM`` and compares its logits with the training model's on held-out
   prompts (max |Δ| ≤ 1e-4, else an error);
5. with ``push_to_hub=org/name`` uploads the folder with the token from ``HF_TOKEN`` (never printed);
   ``dry_run=true`` prints exactly what would be uploaded and touches no network.

ZeRO-3 runs save gathered weights at the end of training, so ``final`` needs no shard gathering here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

KEYS = {"run": None, "merge_lora": "false", "out": None, "push_to_hub": None, "dry_run": "false", "private": "true"}


class ExportError(ValueError):
    """The run cannot be exported as asked (named cause)."""


def parse(argv: list[str]) -> dict[str, Any]:
    args = dict(KEYS)
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise ExportError(f"unknown argument {a!r}; expected key=value with key in {', '.join(KEYS)}")
        args[key] = value
    if not args["run"]:
        raise ExportError("run=<run directory> is required")
    for flag in ("merge_lora", "dry_run", "private"):
        if args[flag] not in ("true", "false"):
            raise ExportError(f"{flag} must be true or false, got {args[flag]!r}")
        args[flag] = args[flag] == "true"
    return args


def load_trained(final: Path):
    """(model as trained, base model or None, is_adapter)."""
    if not (final / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(final), None, False
    from peft import PeftModel

    base_path = json.loads((final / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise ExportError(f"{final}/adapter_config.json names no base model; cannot rebuild the adapter's base")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    if not lora_b or all(torch.count_nonzero(p) == 0 for p in lora_b):
        raise ExportError(f"empty adapter in {final}: every lora_B weight is still zero (its initial value), so the "
                          "adapter changes nothing; training did not reach it (check peft.target_modules and the lr)")
    return trained.eval(), base.eval(), True


def merged_equals_base(merged, base) -> bool:
    b = base.state_dict()
    return all(torch.equal(v, b[k]) for k, v in merged.state_dict().items() if k in b)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def model_card(run_dir: Path, repo: str | None, merged: bool, adapter: bool) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    kind = "LoRA merged into its base" if merged else ("LoRA adapter" if adapter else "full weights")
    objective = dict(cfg.get("objective", {}))
    return "\n".join([
        "---", "library_name: transformers", "tags: [tokensel, token-selective-training]", "---", "",
        f"# {repo or run_dir.name}", "",
        f"Trained with [tokensel](https://github.com/) — experiment `{summary['experiment']}`: "
        f"{cfg.get('description', '')}.", "",
        f"- weights: {kind}",
        f"- objective: `{objective.get('name')}` with {json.dumps({k: v for k, v in objective.items() if k != 'name'})}",
        f"- task / data: `{cfg.get('task', {}).get('name')}` ({json.dumps(cfg.get('task', {}))})",
        f"- base model: `{cfg.get('model', {}).get('name_or_path') or 'tiny (built locally)'}`",
        f"- training steps: {summary.get('rl_steps')}, seed {cfg.get('seed')}",
        f"- held-out accuracy ({summary.get('accuracy_metric')}): {_pct(summary.get('accuracy_before'))} before → "
        f"{_pct(summary.get('accuracy_after'))} after", "",
        "## Configuration", "", "```yaml", (run_dir / "config.yaml").read_text().strip(), "```", "",
    ])


@torch.no_grad()
def max_logit_difference(a, b, tokenizer, prompts: list[str]) -> float:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    la = a(**enc).logits.float()
    lb = b(**enc).logits.float()
    mask = enc["attention_mask"].bool()
    return float((la - lb).abs()[mask].max())


def push_plan(folder: Path, repo: str) -> list[dict[str, Any]]:
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "repo": repo}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def export(run: str, merge_lora: bool = False, out: str | None = None, push_to_hub: str | None = None,
           dry_run: bool = False, private: bool = True) -> dict[str, Any]:
    run_dir = Path(run)
    final = run_dir / "final"
    if not final.is_dir():
        raise ExportError(f"{final} does not exist: the run did not finish (resume it with resume=auto)")
    trained, base, adapter = load_trained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    merged = False
    model = trained
    if adapter and merge_lora:
        model = trained.merge_and_unload()
        merged = True
        if merged_equals_base(model, base):
            raise ExportError("the merged model is identical to its base: the adapter's update is zero (lora_A or "
                              "lora_B all zero); refusing to export a copy of the base as a trained model")
        trained, _, _ = load_trained(final)  # merge_and_unload modified the first copy in place
    target = Path(out) if out else run_dir / "export"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "README.md").write_text(model_card(run_dir, push_to_hub, merged, adapter))
    report: dict[str, Any] = {"out": str(target), "merged": merged, "adapter": adapter}
    prompts = ["12+7=", "3+45=", "60+9=", "8+8="]
    if adapter and not merged:
        from peft import AutoPeftModelForCausalLM

        reloaded = AutoPeftModelForCausalLM.from_pretrained(target).eval()
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    diff = max_logit_difference(trained, reloaded, tokenizer, prompts)
    report["max_logit_difference"] = diff
    if diff > 1e-4:
        raise ExportError(f"the exported model's logits differ from the training model's by {diff:.2e} (> 1e-4)")
    if push_to_hub:
        report["upload"] = push_plan(target, push_to_hub)
        if dry_run:
            report["dry_run"] = True
        else:
            token = os.environ.get("HF_TOKEN")
            if not token:
                raise ExportError("push_to_hub needs a token in the HF_TOKEN environment variable")
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(push_to_hub, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(target), repo_id=push_to_hub)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        report = export(**args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for item in report.pop("upload", []):
        print(f"{'would upload' if report.get('dry_run') else 'uploaded'} {item['path']} ({item['bytes']} bytes) "
              f"to {item['repo']}")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
