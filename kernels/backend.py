"""Backend dispatch (``specs/kernels.md`` §3.7): CUDA tensors with Triton importable go to Triton; everything else,
and every fp64 input, goes to the chunked torch path. ``TOKENSEL_KERNELS_BACKEND=auto|torch|triton`` or
``use_backend(...)`` overrides; on CPU the Triton path runs only when forced and ``TRITON_INTERPRET=1`` is set (tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokensel_kernels_backend", default=None)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block (overrides ``TOKENSEL_KERNELS_BACKEND``)."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


def requested() -> str:
    return _override.get() or _check(os.environ.get("TOKENSEL_KERNELS_BACKEND", "auto").lower())


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(x: torch.Tensor):
    """The ops object (``EagerOps`` or ``TritonOps``) for tensors like ``x``."""
    from .chunked import EagerOps

    want = requested()
    if want == "torch" or x.dtype == torch.float64:
        return EagerOps
    if want == "auto" and not (x.is_cuda and triton_available()):
        return EagerOps
    if not triton_available():
        raise RuntimeError("kernels backend 'triton' requested but triton is not installed (pip install triton)")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing "
                           "triton); use 'torch' for CPU training")
    from .triton_fold import TritonOps

    return TritonOps
