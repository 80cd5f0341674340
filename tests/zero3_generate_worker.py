"""Generation under ZeRO-3 with ranks that stop at different lengths (run under torchrun, 2 CPU ranks, gloo).

Rank r generates ``MAX_NEW[r]`` tokens from its own prompts, so one rank stops long before the other. Two modes:

* ``gather``: the held-out evaluation's path (``trainer.distributed.full_weights``): every rank gathers the full weights,
  then generates alone; no collective runs inside ``generate``;
* ``sharded``: weights stay partitioned; transformers' ``generate`` sees ZeRO-3 and keeps the ranks in lock-step
  (``synced_gpus``), the finished rank running dummy forwards until every rank is done (the path of
  ``trainer.ds3_gather_for_generation=false`` rollouts).

Each rank writes its greedy completions and those of the same model outside DeepSpeed to ``argv[2]/rank<r>.json``;
a deadlock shows as a timeout in the test.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from trainer.distributed import full_weights

MAX_NEW = (2, 12)
ROOT = Path(__file__).resolve().parent.parent


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=47,
                      bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def main(mode: str, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "deepspeed" / "zero3.yaml").config)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=2,
              gradient_clipping=1.0, bf16={"enabled": False})
    ds["zero_optimization"].update(reduce_bucket_size=1000, stage3_prefetch_bucket_size=1000,
                                   stage3_param_persistence_threshold=0)  # partition every weight
    keep_alive = HfDeepSpeedConfig(ds)  # what TrainingArguments(deepspeed=...) sets up: is_deepspeed_zero3_enabled()
    prompts = torch.tensor([[2, 5 + rank, 6, 7], [2, 9, 10 + rank, 11]])
    plain = tiny()
    expected = plain.generate(input_ids=prompts, max_new_tokens=MAX_NEW[rank], do_sample=False, pad_token_id=0)
    engine, *_ = deepspeed.initialize(model=tiny(), config=ds)
    model = engine.module
    assert all(p.numel() == 0 for p in model.parameters()), "weights are not partitioned"
    with torch.no_grad():
        if mode == "gather":
            with full_weights(model):
                got = model.generate(input_ids=prompts, max_new_tokens=MAX_NEW[rank], do_sample=False, pad_token_id=0)
        else:
            got = model.generate(input_ids=prompts, max_new_tokens=MAX_NEW[rank], do_sample=False, pad_token_id=0)
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({"got": got.tolist(), "expected": expected.tolist()}))
    del keep_alive


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
