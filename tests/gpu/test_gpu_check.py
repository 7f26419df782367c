"""tools/gpu_check.py cannot rot: --help works here, and its CPU dry run (every check at small
shapes: memory math, models, a torchrun pretrain with resume, the layer benchmark) passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help():
    done = _run("--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout and "--lengths" in done.stdout


def test_cpu_dry_run_passes_every_check():
    done = _run("--device", "cpu", "--lengths", "64", "--repeats", "1", timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    for check in ("math", "models", "training", "bench"):
        assert f"[{check}] PASS" in out, out[-4000:]
    assert "[te] SKIP" in out  # needs CUDA and transformer_engine
    assert "gpu_check: all checks passed" in out
    # The benchmark printed a row per model for both document layouts.
    assert sum(line.split()[2:3] == ["v2"] for line in out.splitlines() if line.strip().startswith("64")) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error():
    done = _run("--device", "cuda", timeout=120)
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
