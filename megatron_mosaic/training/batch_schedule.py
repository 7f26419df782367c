"""Global batch size per step, through megatron-core's num-microbatches calculator.

Constant (``--global-batch-size``) or ramped up (``--rampup-batch-size START INCREMENT SAMPLES``):
the micro-batch size stays fixed and the number of micro-batches grows, so the pretraining
sampler (consecutive blocks of micro-batch x DP samples) needs no change and a resumed run
picks up the ramp where it was from its consumed samples.
"""

from __future__ import annotations

import argparse

from megatron.core import num_microbatches_calculator as calculator


def _new_calculator(args: argparse.Namespace, rank: int = 0):
    return calculator._build_num_microbatches_calculator(
        rank, args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
        args.data_parallel_size, False)


def rampup_train_iters(args: argparse.Namespace) -> int:
    """Iterations that --train-samples takes with the ramp (Megatron-LM's update_train_iters):
    steps of the growing batch until the ramp's samples are used, then full batches; a partial
    last batch is dropped."""
    ramp = _new_calculator(args, rank=1)  # rank != 0: no log line
    iterations = consumed = 0
    while consumed <= args.rampup_batch_size[2] and consumed <= args.train_samples:
        ramp.update(consumed, False)
        consumed += ramp.get_current_global_batch_size()
        iterations += 1
    if args.train_samples > consumed:
        iterations += (args.train_samples - consumed) // args.global_batch_size
    return iterations


def init_batch_schedule(args: argparse.Namespace, rank: int) -> None:
    """(Re)build the process-wide calculator for this run (tests run several in one process)."""
    calculator.unset_num_microbatches_calculator()
    calculator.init_num_microbatches_calculator(
        rank, args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
        args.data_parallel_size, False)


def batch_for_step(consumed_samples: int) -> tuple[int, int]:
    """(micro-batches, global batch size) of the step that starts after ``consumed_samples``."""
    calculator.update_num_microbatches(consumed_samples, consistency_check=True)
    return calculator.get_num_microbatches(), calculator.get_current_global_batch_size()
