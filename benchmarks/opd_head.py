"""The distillation loss pass's LM head at a real vocabulary size, by kept fraction (``specs/tip_opd.md`` §7.3).

One row = one implementation of ``mean over kept tokens of KL(P_S‖P_T)`` forward + backward (gradients of the
student's hidden states and head weight) on ``N`` tokens of which a fraction ``keep`` is kept:

* ``tokensel``: ``kernels.token_stats(..., mask=keep, divergences=("reverse_kl",))`` — projects and back-propagates
  only the kept rows;
* ``trl``: TRL 1.16 ``_chunked_divergence_loss`` with ``loss_mask ∧ keep`` (on CPU it projects every row and masks
  afterwards; on Triton devices it compacts the valid rows first);
* ``naive``: the OPSD-style loss the paper's memory figure comes from — fp32 logits of the kept rows for both models,
  ``log_softmax``, KL; memory grows with ``N_kept × V``;
* ``scoring``: tokensel's no-grad scoring pass over all ``N`` tokens (entropy + reverse KL), paid once per step.

Each row runs in a fresh process (time: median of ``reps`` after one warm-up call; memory: RSS high-water growth
during one call after the warm-up).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.token_stats import _rss_kb, spawn_module

IMPLS = ("tokensel", "trl", "naive")
KEEPS = (1.0, 0.5, 0.2)


def shapes(quick: bool) -> dict:
    return {"N": 64, "d": 16, "V": 128} if quick else {"N": 1024, "d": 256, "V": 32768}


def _tensors(shape: dict, keep: float):
    import torch

    g = torch.Generator().manual_seed(0)
    N, d, V = shape["N"], shape["d"], shape["V"]
    h_s = torch.randn(N, d, generator=g).requires_grad_()
    w_s = (torch.randn(V, d, generator=g) / d**0.5).requires_grad_()
    h_t = torch.randn(N, d, generator=g)
    w_t = torch.randn(V, d, generator=g) / d**0.5
    y = torch.randint(0, V, (N,), generator=g)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[torch.randperm(N, generator=g)[: max(1, round(keep * N))]] = True
    return h_s, w_s, h_t, w_t, y, kept


def _call(impl: str, x) -> None:
    import torch
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    import kernels

    h_s, w_s, h_t, w_t, y, kept = x
    nk = float(kept.sum())
    if impl == "scoring":
        with torch.no_grad():
            kernels.token_stats(h_s, w_s, y, teacher_hidden=h_t, teacher_weight=w_t, divergences=("reverse_kl",))
        return
    if impl == "tokensel":
        rkl = kernels.token_stats(h_s, w_s, y, mask=kept, teacher_hidden=h_t, teacher_weight=w_t,
                                  divergences=("reverse_kl",)).reverse_kl
        loss = (rkl * kept).sum() / nk
    elif impl == "trl":
        loss = _chunked_divergence_loss(h_s[None], h_t[None], w_s, w_t, kept[None].long(), beta=1.0,
                                        num_items_in_batch=nk)[0]
    else:
        lp_s = torch.log_softmax((h_s[kept] @ w_s.t()).float(), -1)
        lp_t = torch.log_softmax((h_t[kept] @ w_t.t()).float(), -1)
        loss = (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()
    grads = torch.autograd.grad(loss, (h_s, w_s))
    del grads


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    x = _tensors(spec["shape"], spec["keep"])
    start = time.perf_counter()
    _call(spec["impl"], x)
    first = time.perf_counter() - start
    if spec["measure"] == "memory":
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
        _call(spec["impl"], x)
        return {"peak_extra_mb": (_rss_kb("VmHWM") - before) / 1024}
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        _call(spec["impl"], x)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "first_call_s": first}


def head_rows(quick: bool, threads: int, reps: int) -> list[dict]:
    """Every implementation × kept fraction, plus the scoring pass; ratios to the same implementation at keep 1."""
    shape = shapes(quick)
    # --quick (the schema test) measures in this process: the numbers are meaningless there, the spawns slow
    run = (lambda spec: worker(spec)) if quick else (lambda spec: spawn_module("benchmarks.opd_head", spec))
    rows = []
    jobs = [(impl, keep) for impl in IMPLS for keep in KEEPS] + [("scoring", 1.0)]
    for impl, keep in jobs:
        spec = {"impl": impl, "keep": keep, "shape": shape, "threads": threads, "reps": reps}
        row = {"impl": impl, "keep": keep, **shape}
        row.update(run(spec | {"measure": "time"}))
        row.update(run(spec | {"measure": "memory"}))
        rows.append(row)
    n, d, v = shape["N"], shape["d"], shape["V"]
    for r in rows:
        full = next(x for x in rows if x["impl"] == r["impl"] and x["keep"] == 1.0)
        r["time_vs_keep1"] = r["median_ms"] / full["median_ms"]
        trl = next((x for x in rows if x["impl"] == "trl" and x["keep"] == r["keep"]), None)
        r["time_vs_trl"] = r["median_ms"] / trl["median_ms"] if trl else None
        flops = (4 if r["impl"] == "scoring" else 12 * r["keep"]) * n * d * v  # spec §7.3 cost model
        r["model_gflop"] = flops / 1e9
        r["gflops_per_s"] = flops / 1e6 / r["median_ms"]
    return rows


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
