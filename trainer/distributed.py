"""Where a run lives and how its processes find each other: the run directory shared by every rank of a job, the
rank helpers, and DeepSpeed's process group, config and full-weight context."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
from omegaconf import OmegaConf

JOB_ID_VARS = ("TOKENSEL_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID", "PBS_JOBID")


def run_directory(cfg) -> Path:
    """``<run.root>/<name>``: the launcher's job id (shared by all ranks), else the experiment name."""
    name = cfg.run.name
    if not name:
        job = next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v) not in (None, "", "none")), None)
        name = f"{cfg.experiment or 'run'}-{job}" if job else (cfg.experiment or "run")
    return Path(cfg.run.root) / name


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def init_deepspeed(cfg) -> None:
    """DeepSpeed's process group before the model exists (gloo on CPU); a single process gets the env it needs."""
    import deepspeed

    if "RANK" not in os.environ:  # `python -m trainer deepspeed=...` without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")


def deepspeed_config(cfg) -> str | dict | None:
    ds = cfg.deepspeed
    if not ds.enabled:
        return None
    return ds.config_file or OmegaConf.to_container(ds.config, resolve=True)


def full_weights(model):
    """Under ZeRO-3, a context in which every rank holds the full weights (a collective: all ranks enter it)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def full_copy(param: torch.Tensor) -> torch.Tensor:
    """A detached tensor holding all of ``param``: itself, or under ZeRO-3 a gathered copy (a collective: every
    rank calls it at the same point). For weights read outside their module's forward that need no gradient, such
    as a frozen reference model's LM head whose logits the kernels recompute in the backward."""
    if param.numel() > 0 or not hasattr(param, "ds_id"):
        return param.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().clone()
