"""``python -m trainer +experiment=<name> [key=value ...]``

parse -> validate (every config error at once, before any model loads) -> run (build, warm-up, evaluate, RL,
evaluate, summary). Launchers:

    python -m trainer +experiment=quickstart                     # one process (CPU or one GPU)
    torchrun --nproc_per_node=2 -m trainer +experiment=...       # DDP (gloo on CPU, nccl on GPU)
    deepspeed --no_local_rank --module trainer +experiment=...   # --local_rank=N is also accepted and ignored
"""

from __future__ import annotations

import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Upstream deprecations raised inside TRL/transformers calls we do not control; they bury the run's output.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl)\.")
    from .config import ConfigError, compose, experiments

    if not any(a.lstrip("+").startswith("experiment=") for a in args) or "--help" in args or "-h" in args:
        print("usage: python -m trainer +experiment=<name> [key=value ...]\n\nexperiments:")
        for name, desc in experiments().items():
            print(f"  {name:<16} {desc}")
        return 0 if ("--help" in args or "-h" in args) else 2
    if "--cfg" in args:
        args.remove("--cfg")
        print_only = True
    else:
        print_only = False
    try:
        resolved = compose(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if print_only:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(resolved.cfg, resolve=True))
        return 0
    from .run import run

    run(resolved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
