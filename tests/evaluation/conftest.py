"""Tiny checkpoints of every --model, trained by pretrain_mosaic.py itself, and their HF exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("mosaic-v1", "mosaic-v2", "gpt")
TRAIN_LENGTH = 32
VOCAB = 100
TINY = ["--mock-data", "--vocab-size", str(VOCAB), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--seq-length", str(TRAIN_LENGTH),
        "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--short-term-window", "8",
        "--long-term-delay-range", "2", "6", "--long-term-inference-delay", "4", "--persistent-memory-size", "24",
        "--eval-iters", "0", "--per-position-eval-iters", "0", "--no-progress-bar"]


def train_tiny(model: str, save: str, extra: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "pretrain_mosaic.py"), "--model", model, *TINY,
                             "--save", save, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return save


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, dict[str, str]]:
    """model -> {"megatron": checkpoint dir, "hf": exported dir}."""
    from megatron_mosaic.hf.export import export_to_hf

    root = tmp_path_factory.mktemp("eval_checkpoints")
    out = {}
    for model in MODELS:
        megatron = train_tiny(model, str(root / model))
        hf = str(root / f"{model}-hf")
        export_to_hf(megatron, hf)
        out[model] = {"megatron": megatron, "hf": hf}
    return out


def pretrain(argv: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   f"--nproc_per_node={nproc}", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(launcher + [str(ROOT / "pretrain_mosaic.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def cp_run(tmp_path_factory) -> dict:
    """mosaic-v2 trained and saved under --context-parallel-size 2 (torchrun, 2 ranks), its
    per-position pass at 3x the training length: one run for the --eval-seq-length test and
    for scoring a checkpoint saved with context parallelism."""
    root = tmp_path_factory.mktemp("cp_run")
    argv = [*TINY, "--model", "mosaic-v2", "--context-parallel-size", "2", "--eval-seq-length",
            str(3 * TRAIN_LENGTH), "--eval-iters", "1", "--per-position-eval-iters", "1",
            "--tensorboard-dir", str(root / "tb"), "--save", str(root / "checkpoint")]
    return {"result": pretrain(argv, nproc=2), "tb": root / "tb", "checkpoint": str(root / "checkpoint")}


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> str:
    """A small real-text corpus (JSON lines, two works) for multidoc and lm."""
    import json

    path = tmp_path_factory.mktemp("text") / "works.jsonl"
    first = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
             "shake the darling buds of May, and summer's lease hath all too short a date. ") * 8
    second = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
              "that lour'd upon our house in the deep bosom of the ocean buried. ") * 8
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (first, second)))
    return str(path)
