"""The Triton path under the interpreter (specs/kernels.md §9.4), in a subprocess because TRITON_INTERPRET must be
set before triton is imported."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

SUITE = Path(__file__).with_name("triton_interpreter_suite.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (dev extra, Linux x86-64)")
def test_triton_path_passes_hand_vectors_and_random_cases_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SUITE.parent.parent)}
    res = subprocess.run([sys.executable, str(SUITE)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "all triton interpreter checks passed" in res.stdout


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        kernels.token_stats_from_logits(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown kernels backend"), kernels.use_backend("cuda"):
        pass
