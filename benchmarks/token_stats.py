"""Per-token statistics (log-prob, entropy, teacher divergences): tokensel kernels vs naive PyTorch vs TRL 1.16.

    python -m benchmarks.token_stats [--quick] [--out benchmarks/results] [--threads 2]

Every (case, variant) runs in two fresh processes: one for time (median and min of several calls after a warm-up)
and one for memory (peak RSS growth during one call, measured with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
buffers return to the OS, after resetting the high-water mark through ``/proc/self/clear_refs``). Writes
``token_stats_cpu.json`` and ``token_stats_cpu.png`` and prints the ratio table; timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = {"N": 4096, "V": 32000, "d": 1024}
LARGE_VOCAB = {"N": 1024, "V": 151936, "d": 1024}
QUICK = {"N": 64, "V": 300, "d": 16}

VARIANTS = {
    # ours = the default configuration (compiled fold at these sizes); ours_eager = TOKENSEL_KERNELS_COMPILE=0;
    # floor_read = one read of the logits (amax), the bandwidth floor of any logits-level pass
    "logits": ["ours", "ours_eager", "naive", "trl", "floor_read"],
    "hidden": ["ours", "naive", "trl_tile32768", "trl_tile4096"],
    # distillation: student fwd+bwd of Σ divergence with a teacher head of the same shape
    "distill": ["ours", "naive", "trl"],
}
DISTILL = ("reverse_kl", "jsd")


def cases(quick: bool) -> list[dict]:
    shapes = [("main", QUICK if quick else FULL)] + ([] if quick else [("large_vocab", LARGE_VOCAB)])
    out = []
    for name, shape in shapes:
        out += [
            {"shape_name": name, **shape, "level": "logits", "mode": "fwd", "keep": 1.0},
            {"shape_name": name, **shape, "level": "logits", "mode": "fwd+bwd", "keep": 1.0},
            {"shape_name": name, **shape, "level": "hidden", "mode": "fwd", "keep": 1.0},
            {"shape_name": name, **shape, "level": "hidden", "mode": "fwd+bwd", "keep": 1.0},
            {"shape_name": name, **shape, "level": "hidden", "mode": "fwd+bwd_frozen", "keep": 1.0},
        ]
        out += [{"shape_name": name, **shape, "level": "distill", "mode": "fwd+bwd", "keep": 1.0, "divergence": div}
                for div in DISTILL]
        out += [{"shape_name": name, **shape, "level": "hidden", "mode": "selective", "keep": k} for k in (0.5, 0.2)]
    return out


def variants_for(case: dict) -> list[str]:
    # selective = statistics for all rows, gradient only on the kept rows: only a selective kernel can exploit it,
    # the peers' full fwd+bwd is the reference it is compared with.
    if case["mode"] == "selective":
        return ["ours"]
    if case["level"] == "logits" and case["mode"] != "fwd":  # the floor and the compiled fold are forward-only
        return ["ours", "naive", "trl"]
    return VARIANTS[case["level"]]


# ---- worker side (runs in a fresh process) ---------------------------------------------------------------------
def _inputs(case: dict):
    import torch

    g = torch.Generator().manual_seed(0)
    N, V, d = case["N"], case["V"], case["d"]
    y = torch.randint(0, V, (N,), generator=g)
    if case["level"] == "logits":
        return {"z": torch.randn(N, V, generator=g) * 4, "y": y}
    x = {"h": torch.randn(N, d, generator=g), "W": torch.randn(V, d, generator=g) / d**0.5, "y": y}
    if case["level"] == "distill":  # a teacher that correlates with the student, as in specs/kernels.md §8.3
        x["th"] = x["h"] + 0.2 * torch.randn(N, d, generator=g)
        x["tW"] = x["W"] + 0.2 * torch.randn(V, d, generator=g) / d**0.5
    return x


def _call(variant: str, case: dict, x: dict) -> None:
    import torch

    bwd = case["mode"] != "fwd"
    ctx = torch.enable_grad() if bwd else torch.no_grad()
    with ctx:
        if case["level"] == "distill":
            h, W = x["h"].requires_grad_(), x["W"].requires_grad_()
            div = _distill_variant(variant, h, W, x["th"], x["tW"], x["y"], case["divergence"])
            torch.autograd.grad(div.sum(), [h, W])
            return
        if case["level"] == "logits":
            z = x["z"].requires_grad_(bwd)
            logp, ent = _logits_variant(variant, z, x["y"])
            leaves = [z]
        else:
            frozen = case["mode"] == "fwd+bwd_frozen"  # LoRA-style: the head is frozen, only dh is needed
            h, W = x["h"].requires_grad_(bwd), x["W"].requires_grad_(bwd and not frozen)
            logp, ent = _hidden_variant(variant, h, W, x["y"])
            leaves = [h] if frozen else [h, W]
        if bwd:
            weight = torch.ones_like(logp)
            if case["mode"] == "selective":
                n = logp.shape[0]
                kept = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(round(case["keep"] * n))]
                weight = torch.zeros_like(logp).index_fill_(0, kept, 1.0)
            torch.autograd.grad((weight * (logp + 0.01 * ent)).sum(), leaves)


def _logits_variant(variant, z, y):
    import torch

    if variant in ("ours", "ours_eager"):
        import kernels

        os.environ["TOKENSEL_KERNELS_COMPILE"] = "0" if variant == "ours_eager" else "auto"
        s = kernels.token_stats_from_logits(z, y)
        return s.logp, s.entropy
    if variant == "floor_read":
        m = z.amax(dim=-1)
        return m, m
    if variant == "naive":
        logq = torch.log_softmax(z, dim=-1)
        return logq.gather(-1, y[:, None]).squeeze(-1), -(logq.exp() * logq).sum(-1)
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax(z, y), entropy_from_logits(z)


def _hidden_variant(variant, h, W, y):
    import torch

    if variant == "ours":
        import kernels

        s = kernels.token_stats(h, W, y)
        return s.logp, s.entropy
    if variant == "naive":
        logq = torch.log_softmax(h @ W.t(), dim=-1)
        return logq.gather(-1, y[:, None]).squeeze(-1), -(logq.exp() * logq).sum(-1)
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    tile = int(variant.removeprefix("trl_tile"))
    return ChunkedLogProbFunction.apply(h, W, None, y, 1.0, tile, None, 1.0, ("entropy",))[:2]


def _distill_variant(variant, h, W, th, tW, y, divergence):
    import torch

    if variant == "ours":
        import kernels

        s = kernels.token_stats(h, W, y, teacher_hidden=th, teacher_weight=tW, divergences=(divergence,))
        return getattr(s, divergence)
    if variant == "naive":
        logp = torch.log_softmax(h @ W.t(), dim=-1)
        with torch.no_grad():
            logq = torch.log_softmax(th @ tW.t(), dim=-1)
        if divergence == "reverse_kl":
            return (logp.exp() * (logp - logq)).sum(-1)
        log_m = torch.logaddexp(logp + torch.log(torch.tensor(0.5)), logq + torch.log(torch.tensor(0.5)))
        return 0.5 * (logq.exp() * (logq - log_m)).sum(-1) + 0.5 * (logp.exp() * (logp - log_m)).sum(-1)
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    beta = 1.0 if divergence == "reverse_kl" else 0.5
    return ChunkedDivergenceFunction.apply(h, W, None, th, tW, None, beta, 1.0)[0]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    case, variant = spec["case"], spec["variant"]
    x = _inputs(case)
    start = time.perf_counter()
    _call(variant, case, x)
    first = time.perf_counter() - start
    if spec["measure"] == "memory":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kb("VmRSS")
        _call(variant, case, x)
        return {"peak_extra_mb": (_rss_kb("VmHWM") - before) / 1024}
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        _call(variant, case, x)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "first_call_s": first}


def accuracy(case: dict) -> dict:
    """Max abs error of our logp/entropy against fp64 (on a 256-row subsample for speed)."""
    import torch

    import kernels

    x = _inputs(case)
    rows = slice(0, min(256, case["N"]))
    y = x["y"][rows]
    if case["level"] == "distill":
        div = case["divergence"]
        h = x["h"][rows].clone().requires_grad_()
        ours = kernels.token_stats(h, x["W"], y, teacher_hidden=x["th"][rows], teacher_weight=x["tW"],
                                   divergences=(div,))
        h64 = x["h"][rows].double().requires_grad_()
        ref = kernels.reference_token_stats(y, hidden=h64, weight=x["W"].double(), teacher_hidden=x["th"][rows].double(),
                                            teacher_weight=x["tW"].double(), divergences=(div,))
        (g,) = torch.autograd.grad(getattr(ours, div).sum(), h)
        (g64,) = torch.autograd.grad(getattr(ref, div).sum(), h64)
        return {"kl": float((getattr(ours, div).detach().double() - getattr(ref, div).detach()).abs().max()),
                "grad_rel_err_hidden": float((g.double() - g64).norm() / g64.norm())}
    if case["level"] == "logits":
        ours = kernels.token_stats_from_logits(x["z"][rows], y)
        ref = kernels.reference_token_stats(y, logits=x["z"][rows].double())
    else:
        ours = kernels.token_stats(x["h"][rows], x["W"], y)
        ref = kernels.reference_token_stats(y, hidden=x["h"][rows].double(), weight=x["W"].double())
    return {"logp": float((ours.logp.double() - ref.logp).abs().max()),
            "entropy": float((ours.entropy.double() - ref.entropy).abs().max()), "dtype": str(torch.float32)}


# ---- driver side --------------------------------------------------------------------------------------------------
def mandatory_mb(case: dict) -> float:
    """Bytes of the gradients the call must return anyway (dlogits; dh, dW), part of every variant's peak."""
    N, V, d = case["N"], case["V"], case["d"]
    if case["mode"] == "fwd":
        return 0.0
    if case["level"] == "logits":
        return N * V * 4 / 2**20
    return (N * d + (0 if case["mode"] == "fwd+bwd_frozen" else V * d)) * 4 / 2**20


def spawn(spec: dict) -> dict:
    return spawn_module("benchmarks.token_stats", spec)


def spawn_module(module: str, spec: dict) -> dict:
    """Run ``python -m module --worker spec`` in a fresh process; its last stdout line is the JSON result."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec["threads"])}
    p = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        if "out of memory" in p.stderr.lower() or p.returncode == -9:
            return {"status": "oom"}
        raise RuntimeError(f"worker failed for {spec}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def environment(threads: int) -> dict:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "threads": threads, "device": "cpu"}


def ratios(results: list[dict]) -> None:
    """Time and memory of every row relative to naive (and ours relative to each peer) of the same case."""
    def key(r):
        return (r["shape_name"], r["level"], r["mode"] if r["mode"] != "selective" else "fwd+bwd", r.get("divergence"))

    base = {key(r): r for r in results if r["variant"] == "naive" and r["mode"] != "selective"}
    for r in results:
        ref = base.get(key(r))
        if ref and "median_ms" in r and "median_ms" in ref:
            r["time_vs_naive"] = r["median_ms"] / ref["median_ms"]
            # below 1 MB the RSS growth is allocator noise, not a meaningful denominator
            r["memory_vs_naive"] = r["peak_extra_mb"] / ref["peak_extra_mb"] if ref["peak_extra_mb"] >= 1 else None
    ours = {key(r): r for r in results if r["variant"] == "ours" and r["mode"] != "selective"}
    for r in results:
        o = ours.get(key(r))
        if r["variant"] not in ("ours", "ours_eager", "naive") and o and "median_ms" in r:
            r["ours_speedup"] = r["median_ms"] / o["median_ms"]
            r["ours_memory_ratio"] = o["peak_extra_mb"] / r["peak_extra_mb"] if r["peak_extra_mb"] >= 1 else None


def targets(results: list[dict]) -> list[dict]:
    """The CPU acceptance bars of specs/kernels.md §13 / issue 3, on the main shape."""
    def find(level, mode, variant, keep=1.0):
        return next((r for r in results if r["shape_name"] == "main" and r["level"] == level and r["mode"] == mode
                     and r["variant"] == variant and r["keep"] == keep and "median_ms" in r), None)

    out = []

    def bar(name, limit, value, le=True):
        if value is not None:  # a ratio with a sub-MB denominator is noise: no verdict
            out.append({"name": name, "bar": limit, "measured": value, "pass": value <= limit if le else value >= limit})

    lf, lt = find("logits", "fwd", "ours"), find("logits", "fwd", "trl")
    if lf:
        n_v_bytes = lf["N"] * lf["V"] * 4 / 2**20
        bar("logits fwd time vs naive", 0.15, lf.get("time_vs_naive"))
        bar("logits fwd time vs TRL CPU path", 0.15, lf["median_ms"] / lt["median_ms"] if lt else None)
        bar("logits fwd extra memory / (N*V*4)", 0.01, lf["peak_extra_mb"] / n_v_bytes)
        floor = find("logits", "fwd", "floor_read")
        bar("logits fwd time vs one-read floor", 4.0, lf["median_ms"] / floor["median_ms"] if floor else None)
    le = find("logits", "fwd", "ours_eager")
    if le:
        bar("logits fwd, eager fallback, time vs naive", 0.2, le.get("time_vs_naive"))
    hb = find("hidden", "fwd+bwd", "ours")
    if hb:
        bar("hidden fwd+bwd time vs naive", 1.1, hb.get("time_vs_naive"))
        bar("hidden fwd+bwd extra memory vs naive", 0.2, hb.get("memory_vs_naive"))
        for tile in ("trl_tile32768", "trl_tile4096"):
            t = find("hidden", "fwd+bwd", tile)
            if t:
                bar(f"hidden fwd+bwd speedup vs TRL ChunkedLogProbFunction ({tile})", 1.3, t["ours_speedup"], le=False)
                bar(f"hidden fwd+bwd memory vs TRL ({tile})", 1.0, t["ours_memory_ratio"])
    sel = find("hidden", "selective", "ours", 0.2)
    if sel:
        bar("selective keep=0.2 fwd+bwd vs naive full fwd+bwd", 0.55, sel.get("time_vs_naive"))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape_name"], r["level"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (shape, level) in zip(axes[0], panels, strict=True):
        rows = [r for r in results if r["shape_name"] == shape and r["level"] == level and "time_vs_naive" in r]
        labels = [f"{r['variant']}\n{r['mode']}" + (f" {r['keep']}" if r["mode"] == "selective" else "") for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["time_vs_naive"] for r in rows], 0.4, label="time / naive")
        ax.bar([x + 0.2 for x in xs], [max(r["memory_vs_naive"] or 1e-3, 1e-3) for r in rows], 0.4,
               label="extra memory / naive")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
        ax.set_title(f"{level} level, {shape} (N={rows[0]['N'] if rows else '?'}, V={rows[0]['V'] if rows else '?'})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds); for the schema test")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from tqdm.auto import tqdm

    jobs = [(c, v) for c in cases(args.quick) for v in variants_for(c)]
    results = []
    for case, variant in tqdm(jobs, desc="token_stats benchmark"):
        reps = 3 if args.quick else (7 if case["level"] == "logits" else 3)
        spec = {"case": case, "variant": variant, "threads": args.threads, "reps": reps}
        row = {**case, "variant": variant, "dtype": "float32", "mandatory_mb": mandatory_mb(case)}
        # --quick checks the pipeline (schema, plot) in-process; real numbers need fresh processes.
        run = worker if args.quick else spawn
        timing = run(spec | {"measure": "time"})
        memory = run(spec | {"measure": "memory"}) if "status" not in timing else {}
        row.update(timing | memory)
        row.setdefault("status", "ok")
        if variant == "ours" and (case["mode"] == "fwd" or case["level"] == "distill"):
            row["max_abs_err"] = accuracy(case)
        results.append(row)
    ratios(results)
    report = {"benchmark": "token_stats", "quick": args.quick, "environment": environment(args.threads),
              "results": results, "targets": targets(results)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_stats_cpu.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "token_stats_cpu.png")
    print_table(report)
    print(f"wrote {out / 'token_stats_cpu.json'} and {out / 'token_stats_cpu.png'}")
    return 0


def _num(x) -> float:
    return float("nan") if x is None else x


def print_table(report: dict) -> None:
    print(f"\n{'shape':<12}{'level':<8}{'mode':<18}{'variant':<15}{'median ms':>11}{'extra MB':>10}"
          f"{'t/naive':>9}{'mem/naive':>10}")
    for r in report["results"]:
        mode = r["mode"] + (f" {r['keep']}" if r["mode"] == "selective" else "") + (
            f" {r['divergence']}" if "divergence" in r else "")
        print(f"{r['shape_name']:<12}{r['level']:<8}{mode:<18}{r['variant']:<15}{r.get('median_ms', float('nan')):>11.1f}"
              f"{r.get('peak_extra_mb', float('nan')):>10.1f}{_num(r.get('time_vs_naive')):>9.3f}"
              f"{_num(r.get('memory_vs_naive')):>10.3f}")
    print("\ntargets:")
    for t in report["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['measured']:.3f} (bar {t['bar']})")


if __name__ == "__main__":
    sys.exit(main())
