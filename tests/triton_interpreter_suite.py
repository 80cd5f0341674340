"""Run by tests/test_kernels_triton.py in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is
imported): the §9.1 hand vectors and 20 random §9.2 cases on the Triton backend, fp32, against the fp64 oracle."""

import math
import os
import sys
import warnings

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running this suite"
warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy warns on masked −inf lanes the kernel discards

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import reference_token_stats, token_stats, token_stats_from_logits  # noqa: E402

ALL = ("reverse_kl", "forward_kl", "jsd")
FIELDS = ("logp", "entropy", *ALL)
failures: list[str] = []


def close(name: str, got, want, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if not ((got - want).abs() <= atol + rtol * want.abs()).all():
        failures.append(f"{name}: got {got.tolist()} want {want.tolist()}")


def hand_vectors() -> None:
    z = torch.tensor([[0.0, 1.0, 2.0]] * 3, requires_grad=True)
    out = token_stats_from_logits(z, torch.tensor([2, 0, 1]))
    close("T1 logp", out.logp, [-0.407606, -2.407606, -1.407606])
    close("T1 H", out.entropy, [0.832396] * 3)
    (g,) = torch.autograd.grad(out.logp[0] + out.entropy[1], z)
    close("T1 dlogp", g[0], [-0.090031, -0.244728, 0.334759])
    close("T1 dH", g[1], [0.141817, 0.140770, -0.282587])
    z2 = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    out = token_stats_from_logits(z2, torch.tensor([2]), temperature=2.0)
    close("T2", [out.logp.item(), out.entropy.item()], [-0.680270, 1.020191])
    (g,) = torch.autograd.grad(out.logp.sum(), z2)
    close("T2 grad", g[0], [-0.093162, -0.153598, 0.246760])
    out = token_stats_from_logits(torch.zeros(1, 4), torch.tensor([1]))
    close("T3", [out.logp.item(), out.entropy.item()], [-math.log(4), math.log(4)])
    out = token_stats_from_logits(torch.zeros(2, 1), torch.tensor([0, 0]))
    close("T3 V=1", [*out.logp.tolist(), *out.entropy.tolist()], [0.0] * 4, atol=0, rtol=0)
    out = token_stats_from_logits(torch.tensor([[0.0, 1.0, 2.0]]) + 1e4, torch.tensor([2]))
    close("T4", [out.logp.item(), out.entropy.item()], [-0.407606, 0.832396])

    W = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    h = torch.tensor([[1.0, 2.0], [2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    out = token_stats(h, W, torch.tensor([2, 0, 1]), bias=b, grad_mask=torch.tensor([True, False, True]))
    close("T5 logp", out.logp, [-0.407606, -2.239545, -0.861995])
    close("T5 H", out.entropy, [0.832396, 0.665573, 1.017357])
    gh, gw, gb = torch.autograd.grad(out.logp.sum(), (h, W, b))
    close("T6 dh", gh.flatten(), [-0.244728, 0.334759, 0, 0, 0.577681, -0.422319])
    close("T6 dW", gw.flatten(), [-0.245393, -0.335424, 0.332953, 0.088224, -0.087560, 0.247199])
    close("T6 db", gb, [-0.245393, 0.332953, -0.087560])
    out = token_stats(h, W, torch.tensor([2, -100, 1]), temperature=2.0)
    close("T7/T8 logp", out.logp, [-0.680270, 0.0, -0.958020])

    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.5, 0.3, 0.2]])
    zs = p.log().requires_grad_()
    out = token_stats_from_logits(zs, torch.tensor([0]), teacher_logits=q.log(), divergences=ALL)
    close("T9", [out.reverse_kl.item(), out.forward_kl.item(), out.jsd.item(), out.entropy.item()],
          [0.085123, 0.092033, 0.021901, 0.801819])
    (g,) = torch.autograd.grad(out.jsd.sum(), zs)
    close("T9 djsd", g[0], [0.045997, -0.024587, -0.021410])
    out = token_stats(p.log(), torch.eye(3), torch.tensor([0]), teacher_hidden=q.log(), teacher_weight=torch.eye(3),
                      divergences=ALL, temperature=2.0)
    close("T10", [out.reverse_kl.item(), out.forward_kl.item(), out.jsd.item(), out.entropy.item()],
          [0.024574, 0.024647, 0.006137, 1.015757])


def random_cases(n_cases: int = 20) -> None:
    for case in range(n_cases):
        g = torch.Generator().manual_seed(case)
        n, v, d, dt = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((0, 65), (1, 301), (1, 33),
                                                                                    (1, 33)))
        T = [0.3, 0.7, 1.0, 1.7][case % 4]
        teacher, bias, logits_level = case % 3 == 0, case % 2 == 0, case % 5 == 4
        h, W = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 4 / math.sqrt(d)
        b = torch.randn(v, generator=g) if bias else None
        th, tw = torch.randn(n, dt, generator=g), torch.randn(v, dt, generator=g) * 4 / math.sqrt(dt)
        y = torch.randint(0, v, (n,), generator=g)
        mask = torch.rand(n, generator=g) < 0.8
        up = torch.randn(5, n, generator=g) * (torch.rand(n, generator=g) < 0.7)
        kw = dict(temperature=T, mask=mask, divergences=ALL if teacher else (), jsd_beta=0.3)
        fields = FIELDS if teacher else FIELDS[:2]
        if logits_level:
            z = (h @ W.t()).requires_grad_()
            tz = th @ tw.t() if teacher else None
            out = token_stats_from_logits(z, y, teacher_logits=tz, **kw)
            leaves, ref_leaves = [z], [z.detach().double().requires_grad_()]
            ref = reference_token_stats(y, logits=ref_leaves[0],
                                        teacher_logits=None if tz is None else tz.double(), **kw)
        else:
            leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
            ref_leaves = [h.double().requires_grad_(), W.double().requires_grad_()]
            tk = dict(teacher_hidden=th, teacher_weight=tw) if teacher else {}
            out = token_stats(*leaves, y, bias=b, chunk_size=7, **tk, **kw)
            rtk = {k: x.double() for k, x in tk.items()}
            ref = reference_token_stats(y, hidden=ref_leaves[0], weight=ref_leaves[1],
                                        bias=None if b is None else b.double(), **rtk, **kw)
        zmax = float((h @ W.t()).abs().max()) if n else 0.0
        for f in fields:
            close(f"case {case} {f}", getattr(out, f), getattr(ref, f), atol=1e-5 + 2e-7 * zmax)
        if n == 0:
            continue
        loss = sum((up[k] * getattr(out, f)).sum() for k, f in enumerate(fields))
        ref_loss = sum((up[k] * getattr(ref, f)).sum() for k, f in enumerate(fields))
        if not loss.requires_grad:
            continue
        for a, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref_loss, ref_leaves), strict=True):
            rel = float((a.double() - r).norm() / r.norm().clamp_min(1e-30))
            if rel > 1e-5 and float((a.double() - r).norm()) > 1e-6:
                failures.append(f"case {case} gradient relative error {rel:.2e}")


if __name__ == "__main__":
    with kernels.use_backend("triton"):
        kernels.reset_counters()
        hand_vectors()
        random_cases()
    print("\n".join(failures) or "all triton interpreter checks passed")
    sys.exit(1 if failures else 0)
