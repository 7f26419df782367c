"""Shared pieces of the training tests: a tiny run's arguments and in-process runs."""

from __future__ import annotations

import os
from typing import Sequence

# A tiny model on synthetic in-context-learnable data. Clipping at 0.05 is active on every step,
# so the equivalence tests also check the model-parallel gradient norm.
TINY = [
    "--mock-data", "--vocab-size", "64",
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--clip-grad", "0.05",
    "--short-term-window", "8", "--long-term-delay-range", "2", "6", "--long-term-inference-delay", "4",
    "--persistent-memory-size", "16",
    "--log-interval", "1000", "--eval-iters", "0", "--per-position-eval-iters", "0", "--no-progress-bar",
    # Explicit where Megatron-LM's defaults differ: no dropout (the layout equivalence tests
    # compare exact trajectories), no loader worker processes (fast), the schedule these tests
    # were written with.
    "--hidden-dropout", "0", "--attention-dropout", "0", "--num-workers", "0", "--lr-decay-style", "cosine",
    "--adam-beta2", "0.95", "--weight-decay", "0.1",
]


def tiny_args(model: str, extra: Sequence[str], world_size: int):
    from megatron_mosaic.training.arguments import parse_args

    return parse_args(TINY + ["--model", model] + list(extra), world_size)


def run_training(model: str, extra: Sequence[str], world_size: int) -> dict:
    """Train in this (already initialised) process group: ``pretrain``'s steps, returning its
    summary plus ``params``, this rank's final parameters (name -> tensor)."""
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    args = tiny_args(model, extra, world_size)
    initialize_distributed(args)
    run = Run(args)
    reason = run.fit()
    summary = run.finish()
    summary["exit_reason"] = reason
    summary["params"] = {f"{i}.{name}": p.detach().clone()
                         for i, chunk in enumerate(run.model) for name, p in chunk.named_parameters()}
    return summary


def ckpt(root: str, name: str, iteration: int | None = None) -> str:
    path = os.path.join(root, name)
    return path if iteration is None else os.path.join(path, f"iter_{iteration:07d}")


def outcome(fn, *args) -> str:
    """"ok", or the exception a call raised as one line (patch tests: unpatched calls fail in
    different ways)."""
    try:
        fn(*args)
        return "ok"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
