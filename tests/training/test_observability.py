"""--log-throughput (analytic FLOPs), --timing-log-level, --profile, --log-memory-to-tensorboard,
--manual-gc and --wandb-project."""

from __future__ import annotations

import gc
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def _visible_brute_force(model: str, T: int, h: int, delays: range) -> float:
    """Pairs (t, s) a query t retrieves from, enumerated from each memory's rule."""
    if model == "gpt":
        return sum(1 for t in range(T) for s in range(T) if s <= t) / T
    if model == "mosaic-v1":
        return sum(1 for t in range(T) for s in range(T) if s < t) / T
    short = sum(1 for t in range(T) for s in range(T) if t - h < s < t)
    long = sum(1 for m in delays for t in range(T) for s in range(T) if s <= t - m) / len(delays)
    return (short + long) / T


@pytest.mark.parametrize("model", ["gpt", "mosaic-v1", "mosaic-v2"])
def test_retrieval_pairs_and_flops_per_sample(model):
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.flops import flops_per_sample, mean_visible_pairs

    args = parse_args(["--mock-data", "--vocab-size", "64", "--model", model, "--seq-length", "20",
                       "--short-term-window", "5", "--long-term-delay-range", "3", "7",
                       "--num-layers", "2", "--hidden-size", "16"])
    visible = _visible_brute_force(model, 20, 5, range(3, 8))
    assert mean_visible_pairs(args) == pytest.approx(visible)
    assert flops_per_sample(args, 1000) == pytest.approx(3 * 20 * (2 * 1000 + 4 * 16 * 2 * visible))


def _gpt_weights(rank: int, world_size: int) -> tuple[int, int]:
    from megatron_mosaic.training.flops import matmul_weights
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.model_builder import build_model
    from tests.training.common import tiny_args

    args = tiny_args("gpt", [], world_size)
    initialize_distributed(args)
    args.padded_vocab_size = 128
    d, f, layers = args.hidden_size, args.ffn_hidden_size, args.num_layers
    # Per layer: fused QKV (3d x d), output projection (d x d), gated fc1 (2f x d), fc2 (d x f);
    # plus the untied output layer (V x d). The embedding lookup is not a matmul.
    return matmul_weights(build_model(args)), layers * (4 * d * d + 3 * d * f) + d * 128


def test_matmul_weights_of_the_gpt_baseline():
    ((counted, expected),) = run_distributed(_gpt_weights, 1)
    assert counted == expected


def test_throughput_timers_profile_and_memory(tmp_path):
    tb = str(tmp_path / "tb")
    argv = TINY + ["--model", "mosaic-v2", "--train-iters", "3", "--log-interval", "1",
                   "--log-throughput", "--timing-log-level", "1", "--profile", "--profile-step-start",
                   "1", "--profile-step-end", "2", "--log-memory-to-tensorboard", "--tensorboard-dir",
                   tb, "--manual-gc", "--manual-gc-interval", "1", "--empty-unused-memory-level", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_mosaic.py"), *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    tflops = [float(x) for x in re.findall(r"TFLOP/s/device ([\d.e+-]+)", out)]
    assert len(tflops) == 3 and all(x > 0 for x in tflops), out
    assert re.search(r"forward-backward \.+: \([\d.]+, [\d.]+\)", out), out
    assert re.search(r"optimizer \.+: \([\d.]+, [\d.]+\)", out), out
    (trace,) = glob.glob(os.path.join(tb, "profile", "*.pt.trace.json"))
    with open(trace, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    assert any(str(e.get("name", "")).startswith("ProfilerStep#") for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(tb).Reload().Tags()["scalars"]
    assert {"mem-resident-bytes", "throughput"} <= set(scalars), scalars


def test_manual_gc_collects_only_when_told():
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.observability import Observability

    args = parse_args(["--mock-data", "--vocab-size", "64", "--manual-gc", "--manual-gc-interval", "2"])
    collections: list[int] = []
    record = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa: E731
    obs = Observability(args, rank=1)
    gc.callbacks.append(record)
    try:
        assert not gc.isenabled()
        for _ in range(5000):  # cyclic garbage: an enabled collector would run on its own
            cycle: list = []
            cycle.append(cycle)
        obs.step_end(1)  # not a multiple of the interval: no collection
        assert collections == []
        obs.step_end(2)
        assert collections == [2]  # one full collection
    finally:
        gc.callbacks.remove(record)
        obs.close()
    assert gc.isenabled()


@pytest.mark.skipif(HAVE_WANDB, reason="checks the message given without the wandb package")
def test_wandb_project_without_wandb_is_one_clear_line(capsys):
    from megatron_mosaic.training.arguments import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--mock-data", "--vocab-size", "64", "--wandb-project", "p", "--wandb-exp-name", "e"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "--wandb-project needs the wandb package" in err


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not in the locked environment")
def test_wandb_offline_run_is_recorded(tmp_path):
    argv = TINY + ["--model", "gpt", "--train-iters", "2", "--log-interval", "1",
                   "--wandb-project", "mosaic-test", "--wandb-exp-name", "offline",
                   "--wandb-save-dir", str(tmp_path)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_mosaic.py"), *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "run-*.wandb"))


class _Reduced(Exception):
    pass


def _weights_reduced_on(rank: int, world_size: int) -> str:
    """The device of the tensor matmul_weights hands its all-reduce, with the compute device
    made ``meta`` (NCCL on a GPU reduces CUDA tensors only: a CPU tensor there is an error)."""
    from megatron_mosaic.training import flops

    tensors = []

    def all_reduce(tensor, *args, **kwargs):
        tensors.append(tensor)
        raise _Reduced

    original_device, original_reduce = flops.device, flops.dist.all_reduce
    flops.device, flops.dist.all_reduce = (lambda: torch.device("meta")), all_reduce
    try:
        _gpt_weights(rank, world_size)
    except _Reduced:
        pass
    finally:
        flops.device, flops.dist.all_reduce = original_device, original_reduce
    return str(tensors[0].device) if tensors else "no all-reduce"


def test_matmul_weights_reduce_on_the_compute_device():
    assert run_distributed(_weights_reduced_on, 1) == ["meta"]
