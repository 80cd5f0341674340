"""One GRPO optimizer step with a keep-0.2 objective: tokensel vs TRL 1.16 ``GRPOTrainer(top_entropy_quantile=0.2)``.

    python -m benchmarks.grpo_step [--quick] [--out benchmarks/results] [--threads 2]

Same model (a Qwen2 config with a 32k vocabulary, untied head, random weights), same batch (random prompts and
completions of ragged lengths, random advantages), same optimizer (AdamW). A step is ``compute_loss`` → backward →
``optimizer.step()`` on one micro-batch, as inside ``Trainer.training_step``; rollouts are not part of it (they are
identical for both). Each (variant, keep) runs in two fresh processes: one for time (median of several steps after a
warm-up step that also creates the optimizer state) and one for peak memory (RSS high-water growth during one step,
``MALLOC_MMAP_THRESHOLD_=65536``). Writes ``grpo_step_cpu.json`` / ``.png``; timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.token_stats import _rss_kb, environment, spawn_module

FULL = {"vocab": 32000, "hidden": 512, "layers": 4, "heads": 8, "intermediate": 1024, "batch": 16, "prompt": 32,
        "completion": 256}
QUICK = {"vocab": 300, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "batch": 4, "prompt": 4,
         "completion": 8}
VARIANTS = ("tokensel", "trl")
KEEPS = (0.2, 1.0)


# ---- worker side ----------------------------------------------------------------------------------------------
def _model(shape: dict):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         intermediate_size=shape["intermediate"], max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _batch(shape: dict) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    B, P, C, V = shape["batch"], shape["prompt"], shape["completion"], shape["vocab"]
    lengths = torch.randint(C // 4, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(2, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(2, V, (B, C), generator=g) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }


def _trainer(variant: str, keep: float, shape: dict, tmp: str):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from trainer.tokenizer import build_char_tokenizer

    tok: PreTrainedTokenizerFast = build_char_tokenizer()
    args = GRPOConfig(output_dir=tmp, max_steps=1, learning_rate=1e-5, per_device_train_batch_size=shape["batch"],
                      num_generations=shape["batch"], max_completion_length=shape["completion"], loss_type="dapo",
                      report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                      top_entropy_quantile=keep if variant == "trl" else 1.0)
    common = dict(model=_model(shape), processing_class=tok, reward_funcs=[lambda completions, **kw: [0.0] * len(
        completions)], args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * shape["batch"]))
    if variant == "trl":
        return GRPOTrainer(**common)
    import objectives
    from trainer.grpo_adapter import TokenSelectiveGRPOTrainer

    # scope global_batch on one micro-batch = TRL's top_entropy_quantile (the reduction proven in the tests)
    objective = objectives.build("grpo", keep=keep, scope="global_batch", loss_type="dapo",
                                 max_completion_length=shape["completion"])
    return TokenSelectiveGRPOTrainer(objective=objective, **common)


def worker(spec: dict) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(spec["variant"], spec["keep"], spec["shape"], tmp)
        model = trainer.model
        model.train()
        optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); read by TRL's _compute_loss
        inputs = _batch(spec["shape"])

        def step() -> None:
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()  # warm-up: also allocates AdamW's state, which both variants share
        first = time.perf_counter() - start
        if spec["measure"] == "memory":
            Path("/proc/self/clear_refs").write_text("5")
            before = _rss_kb("VmRSS")
            step()
            return {"peak_extra_mb": (_rss_kb("VmHWM") - before) / 1024}
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "first_call_s": first,
                "kernel_stats": bool(getattr(trainer, "kernel_stats", False))}


# ---- driver side ----------------------------------------------------------------------------------------------
def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric, label in ((axes[0], "median_ms", "step time (ms)"), (axes[1], "peak_extra_mb", "peak extra MB")):
        for i, variant in enumerate(VARIANTS):
            rows = [r for r in results if r["variant"] == variant]
            ax.bar([k + (i - 0.5) * 0.35 for k in range(len(rows))], [r.get(metric, 0) for r in rows], 0.35,
                   label=variant)
        ax.set_xticks(range(len(KEEPS)), [f"keep {k}" for k in KEEPS])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("one GRPO optimizer step: tokensel vs TRL 1.16 top_entropy_quantile")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds); for the schema test")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from tqdm.auto import tqdm

    shape = QUICK if args.quick else FULL
    results = []
    for keep in KEEPS:
        for variant in tqdm(VARIANTS, desc=f"grpo step, keep {keep}"):
            spec = {"variant": variant, "keep": keep, "shape": shape, "threads": args.threads, "reps": args.reps}
            run = worker if args.quick else (lambda s: spawn_module("benchmarks.grpo_step", s))
            row = {"variant": variant, "keep": keep, **run(spec | {"measure": "time"})}
            row.update(run(spec | {"measure": "memory"}))
            results.append(row)
    targets = []
    for keep in KEEPS:
        ours = next(r for r in results if r["variant"] == "tokensel" and r["keep"] == keep)
        trl = next(r for r in results if r["variant"] == "trl" and r["keep"] == keep)
        ours["time_vs_trl"] = ours["median_ms"] / trl["median_ms"]
        # below 1 MB the RSS growth is allocator noise, not a meaningful denominator
        ours["memory_vs_trl"] = ours["peak_extra_mb"] / trl["peak_extra_mb"] if trl["peak_extra_mb"] >= 1 else None
        if keep == 0.2 and ours["memory_vs_trl"] is not None:
            targets += [{"name": "step time vs TRL (keep 0.2)", "bar": 1.0, "measured": ours["time_vs_trl"],
                         "pass": ours["time_vs_trl"] <= 1.0},
                        {"name": "step peak memory vs TRL (keep 0.2)", "bar": 1.0, "measured": ours["memory_vs_trl"],
                         "pass": ours["memory_vs_trl"] <= 1.0}]
    report = {"benchmark": "grpo_step", "quick": args.quick, "environment": environment(args.threads),
              "shape": shape, "tokens_per_step": int(_batch(shape)["completion_mask"].sum()), "results": results,
              "targets": targets}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_step_cpu.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "grpo_step_cpu.png")
    print(f"\n{'variant':<10}{'keep':>6}{'median ms':>11}{'peak MB':>10}{'t/TRL':>8}{'mem/TRL':>9}")
    for r in results:
        print(f"{r['variant']:<10}{r['keep']:>6}{r['median_ms']:>11.0f}{r['peak_extra_mb']:>10.0f}"
              f"{r.get('time_vs_trl', float('nan')):>8.3f}{r.get('memory_vs_trl') or float('nan'):>9.3f}")
    for t in targets:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['measured']:.3f} (bar {t['bar']})")
    print(f"wrote {out / 'grpo_step_cpu.json'} and {out / 'grpo_step_cpu.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
