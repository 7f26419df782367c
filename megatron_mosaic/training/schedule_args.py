"""Training length, learning-rate schedule, batch-size ramp-up and optimizer flags, as Megatron-LM
names and checks them (``megatron/training/arguments.py``).

Training is iteration-based (``--train-iters``) or sample-based (``--train-samples``), never both;
each has its own warmup/decay flags. The scheduler itself always counts samples, as Megatron-LM's
does, so the two give the same learning rate at the same point of training.
Stdlib only: parsed before torch is imported.
"""

from __future__ import annotations

import argparse
from typing import Callable

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
# Without --train-iters or --train-samples Megatron-LM stops with an error; a short run here lets
# `pretrain_mosaic.py --mock-data --vocab-size N` alone be a smoke test.
DEFAULT_TRAIN_ITERS = 100


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training length, learning rate and optimizer (Megatron-LM)")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"optimizer steps; default {DEFAULT_TRAIN_ITERS} unless --train-samples")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples instead of --train-iters")
    g.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate (Megatron-LM has no default: it must be given there)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    g.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default="exponential",
                   help="annealing shape of the last phase of --lr-decay-style WSD")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup over this fraction of the decay length (instead of "
                        "--lr-warmup-iters/--lr-warmup-samples)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate warmup starts at")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default: --train-samples")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="length of WSD's annealing phase (iteration-based training)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="length of WSD's annealing phase (sample-based training)")
    g.add_argument("--rampup-batch-size", nargs="*", default=None, metavar="N",
                   help="START INCREMENT SAMPLES: grow the global batch from START by INCREMENT "
                        "up to --global-batch-size over SAMPLES samples (needs --train-samples)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam: AdamW (decoupled weight decay, as Megatron-LM's adam); sgd: SGD")
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def check_schedule_args(args: argparse.Namespace, check: Callable[[bool, str], None]) -> None:
    """Megatron-LM's rules: iteration- and sample-based flags are not mixed."""
    if args.train_samples is not None:
        check(args.train_samples >= 0, f"--train-samples must be >= 0, got {args.train_samples}")
        for flag, value, unset in (("--train-iters", args.train_iters, None),
                                   ("--lr-decay-iters", args.lr_decay_iters, None),
                                   ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters, None),
                                   ("--lr-warmup-iters", args.lr_warmup_iters, 0)):
            check(value == unset, f"{flag} is for iteration-based training; with --train-samples "
                                  f"use its -samples form")
        if args.lr_warmup_fraction is not None:
            check(args.lr_warmup_samples == 0,
                  "--lr-warmup-fraction and --lr-warmup-samples cannot both be given")
    else:
        for flag, value, unset in (("--lr-decay-samples", args.lr_decay_samples, None),
                                   ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples, None),
                                   ("--lr-warmup-samples", args.lr_warmup_samples, 0)):
            check(value == unset, f"{flag} needs sample-based training (--train-samples)")
        check(args.rampup_batch_size is None,
              "--rampup-batch-size needs sample-based training (--train-samples), as in Megatron-LM")
        if args.lr_warmup_fraction is not None:
            check(args.lr_warmup_iters == 0,
                  "--lr-warmup-fraction and --lr-warmup-iters cannot both be given")
    if args.lr_warmup_fraction is not None:
        check(0.0 <= args.lr_warmup_fraction < 1.0,
              f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    check(args.lr_warmup_iters >= 0 and args.lr_warmup_samples >= 0,
          "--lr-warmup-iters/--lr-warmup-samples must be >= 0")
    check(0.0 <= args.min_lr <= args.lr, f"--min-lr ({args.min_lr}) must be in [0, --lr ({args.lr})]")
    check(0.0 <= args.lr_warmup_init <= args.lr,
          f"--lr-warmup-init ({args.lr_warmup_init}) must be in [0, --lr ({args.lr})]")
    if args.rampup_batch_size is not None:
        _check_rampup(args, check)


def _check_rampup(args: argparse.Namespace, check: Callable[[bool, str], None]) -> None:
    values = args.rampup_batch_size
    check(len(values) == 3 and all(v.isdigit() for v in values),
          f"--rampup-batch-size takes START INCREMENT SAMPLES (three integers), got {' '.join(values)}")
    start, increment, _ = (int(v) for v in values)
    step = args.micro_batch_size * args.data_parallel_size
    check(start >= 1 and increment >= 1, "--rampup-batch-size START and INCREMENT must be >= 1")
    check(start % step == 0 and increment % step == 0,
          f"--rampup-batch-size START ({start}) and INCREMENT ({increment}) must be multiples of "
          f"--micro-batch-size x data-parallel size ({step})")
    check(start < args.global_batch_size and (args.global_batch_size - start) % increment == 0,
          f"--global-batch-size ({args.global_batch_size}) - --rampup-batch-size START ({start}) "
          f"must be a positive multiple of INCREMENT ({increment})")


def derive_schedule(args: argparse.Namespace) -> None:
    """Fill --train-iters (from --train-samples when sample-based) and the default decay length.

    With a batch-size ramp-up the number of iterations depends on the ramp;
    ``batch_schedule.rampup_train_iters`` counts them once megatron-core is importable.
    """
    args.rampup_batch_size = (None if args.rampup_batch_size is None
                              else [int(v) for v in args.rampup_batch_size])
    if args.train_samples is None:
        if args.train_iters is None:
            args.train_iters = DEFAULT_TRAIN_ITERS
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
        return
    if args.lr_decay_samples is None:
        args.lr_decay_samples = args.train_samples
    if args.rampup_batch_size is None:
        args.train_iters = args.train_samples // args.global_batch_size
    else:
        from megatron_mosaic.training.batch_schedule import rampup_train_iters

        args.train_iters = rampup_train_iters(args)


def scheduler_steps(args: argparse.Namespace) -> dict:
    """OptimizerParamScheduler lengths in samples, as Megatron-LM's get_optimizer_param_scheduler."""
    if args.train_samples is None:
        gbs = args.global_batch_size
        decay = args.lr_decay_iters * gbs
        warmup = args.lr_warmup_iters * gbs
        wsd = None if args.lr_wsd_decay_iters is None else args.lr_wsd_decay_iters * gbs
        wd_steps = args.train_iters * gbs
    else:
        decay, warmup = args.lr_decay_samples, args.lr_warmup_samples
        wsd, wd_steps = args.lr_wsd_decay_samples, args.train_samples
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return dict(lr_decay_steps=decay, lr_warmup_steps=warmup, wsd_decay_steps=wsd,
                wd_incr_steps=wd_steps)
