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
    for check in ("math", "models", "recompiles", "training", "bench"):
        assert f"[{check}] PASS" in out, out[-4000:]
    assert "[te] SKIP" in out  # needs CUDA and transformer_engine
    assert "gpu_check: all checks passed" in out
    # The benchmark printed a row per model for both document layouts.
    assert sum(line.split()[2:3] == ["v2"] for line in out.splitlines() if line.strip().startswith("64")) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error():
    done = _run("--device", "cuda", timeout=120)
    assert done.returncode == 2 and "CUDA is not available" in done.stderr


def test_a_spent_time_budget_runs_nothing_and_says_so():
    done = _run("--device", "cpu", "--budget-s", "0", timeout=120)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for check in ("math", "models", "recompiles", "bench", "training", "te"):
        assert f"[{check}] SKIP (time budget spent)" in out, out
    assert "gpu_check: all checks passed; not run for time: math models recompiles bench training te" in out


def test_benchmark_rows_past_the_budget_are_listed_as_skipped(capsys):
    from tools.bench_retrieval import compare
    from tools.layer_benchmark import print_device_table

    from megatron_mosaic.training.initialize import single_rank_megatron

    cpu = torch.device("cpu")
    with single_rank_megatron(seed=0):
        print_device_table(cpu, [64, 128], 1, out_of_time=lambda: True)
    pick = compare(cpu, [64], 1, heads=2, dim=8, out_of_time=lambda: True)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if "SKIP (time budget spent)" in line]
    assert [row[:2] for row in rows[:4]] == [["64", "single"], ["64", "packed"], ["128", "single"], ["128", "packed"]]
    assert len(rows) == 6 and pick == "sdpa" and "none (no row ran)" in out


SESSION = os.path.join(REPO, "tools", "gpu_session.sh")


def test_session_fetch_names_the_locked_megatron_core_for_the_gpu_python():
    done = subprocess.run(["bash", SESSION, "fetch", "--print"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(REPO, "requirements", "lock.txt"), encoding="utf-8") as f:
        pinned = next(line.strip() for line in f if line.startswith("megatron-core=="))
    assert pinned in done.stdout.split() and "--python-version 3.12" in done.stdout and "-d .whl" in done.stdout


def test_session_run_logs_gpu_check_into_out(tmp_path):
    # no wheels to install here (a .whl/ fetched in this checkout is for the GPU machine's Python)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_WHEELS=str(tmp_path / "none"))
    done = subprocess.run(["bash", SESSION, "run", "--device", "cpu", "--budget-s", "0"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    assert "not run for time: math models recompiles bench training te" in log and "gpu_check on cpu" in log
    bad = subprocess.run(["bash", SESSION, "launch"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage:" in bad.stderr
