"""Learning-rate schedules, sample-based training and batch-size ramp-up, against formulas written
out here from Megatron-LM's definitions (no process group needed)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mosaic.training.arguments import parse_args
from megatron_mosaic.training.optimizer import build_scheduler

BASE = ["--mock-data", "--vocab-size", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "1.0", "--min-lr", "0.1"]


class _Groups:
    """What OptimizerParamScheduler drives: param_groups with lr / weight_decay."""

    def __init__(self):
        self.param_groups = [{"params": [torch.zeros(1)], "lr": 0.0, "weight_decay": 0.0}]


def lrs(argv: list[str], steps: int) -> list[float]:
    """lr before each of ``steps`` steps, stepping by the global batch size as training does."""
    args = parse_args(BASE + argv)
    optimizer = _Groups()
    scheduler = build_scheduler(optimizer, args)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(args.global_batch_size)
    return out


def test_iteration_and_sample_based_training_give_the_same_schedule():
    by_iters = lrs(["--train-iters", "10", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine"], 11)
    by_samples = lrs(["--train-samples", "80", "--lr-warmup-samples", "16",
                      "--lr-decay-style", "cosine"], 11)
    assert by_iters == pytest.approx(by_samples, abs=1e-12)
    assert by_iters[0] == 0.0 and by_iters[2] == pytest.approx(1.0) and by_iters[10] == pytest.approx(0.1)
    assert parse_args(BASE + ["--train-samples", "80"]).train_iters == 10


def test_warmup_fraction_is_a_fraction_of_the_decay():
    got = lrs(["--train-iters", "10", "--lr-warmup-fraction", "0.4", "--lr-decay-style", "linear"], 6)
    # 4 warmup iterations of 8 samples, from --lr-warmup-init 0: lr = step / 4.
    assert got[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert got[5] == pytest.approx(0.1 + 0.9 * (1 - 1 / 6))  # linear over the 6 decay steps


def test_inverse_square_root():
    got = lrs(["--train-iters", "20", "--lr-warmup-iters", "4", "--lr-decay-style",
               "inverse-square-root"], 20)
    for step, lr in enumerate(got[4:], start=4):  # Megatron: max_lr * sqrt(warmup) / sqrt(step)
        assert lr == pytest.approx(max(0.1, math.sqrt(4 / step)))


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_is_constant_then_anneals_over_its_last_phase(style):
    got = lrs(["--train-iters", "10", "--lr-warmup-iters", "1", "--lr-decay-style", "WSD",
               "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", style], 11)
    assert got[1:7] == pytest.approx([1.0] * 6)  # stable until 10 - 4 iterations
    for step in range(7, 11):
        x = (step - 6) / 4  # progress through the annealing phase
        coeff = {"linear": 1 - x, "cosine": 0.5 * (math.cos(math.pi * x) + 1),
                 "exponential": 2 * 0.5 ** x - 1, "minus_sqrt": 1 - math.sqrt(x)}[style]
        assert got[step] == pytest.approx(0.1 + coeff * 0.9), (style, step)


def test_wsd_needs_its_decay_length():
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--lr-decay-style", "WSD"])


def test_rampup_counts_iterations_as_megatron_lm():
    # Ramp 4 -> 8 by 2 over 8 samples: batches 4 (consumed 0), 6 (consumed 4), then 8s.
    args = parse_args(BASE + ["--train-samples", "40", "--rampup-batch-size", "4", "2", "8"])
    assert args.train_iters == 2 + (40 - 10) // 8
    from megatron_mosaic.training.batch_schedule import batch_for_step, init_batch_schedule

    init_batch_schedule(args, rank=1)
    consumed, sizes = 0, []
    for _ in range(args.train_iters):
        microbatches, size = batch_for_step(consumed)
        assert microbatches * args.micro_batch_size == size
        sizes.append(size)
        consumed += size
    assert sizes == [4, 6, 8, 8, 8]


@pytest.mark.parametrize("argv, fragment", [
    (["--rampup-batch-size", "4", "2", "8"], "--rampup-batch-size needs sample-based training"),
    (["--train-samples", "40", "--rampup-batch-size", "3", "2", "8"], "multiples of --micro-batch-size"),
    (["--train-samples", "40", "--train-iters", "5"], "--train-iters is for iteration-based"),
    (["--lr-warmup-samples", "8"], "--lr-warmup-samples needs sample-based training"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"], "cannot both be given"),
])
def test_megatron_lm_rules_for_mixing_flags(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + argv)
    assert fragment in capsys.readouterr().err
