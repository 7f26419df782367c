"""Logging, timing, profiling and memory flags, named and defaulted as in Megatron-LM.

Stdlib only: parsed before torch is imported. The run-time side is ``observability.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Callable


def add_observability_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("throughput, timing, profiling and memory (Megatron-LM)")
    g.add_argument("--log-throughput", action="store_true",
                   help="log TFLOP/s per device (analytic FLOP count of the model) each log line")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="0: no timers; 1: forward-backward, optimizer, evaluation, checkpoint "
                        "save; 2: also the grad-norm/clip and parameter-update parts")
    g.add_argument("--timing-log-option", choices=("max", "minmax", "all"), default="minmax",
                   help="report the max, min and max, or every rank's time of each timer")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collector; collect at aligned points "
                        "(start/end of evaluation, every --manual-gc-interval steps)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc, collect every this many steps (0: never between steps)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc, do not collect around evaluations")
    g.add_argument("--profile", action="store_true",
                   help="torch profiler trace (Chrome/Perfetto/TensorBoard JSON) of steps "
                        "[--profile-step-start, --profile-step-end) on --profile-ranks, written "
                        "under --tensorboard-dir (else --save, else .) in profile/")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="accepted: --profile always uses the torch profiler here (no nsys)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="TensorBoard: CUDA allocator statistics on GPU, resident memory on CPU")
    g.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0,
                   help="torch.cuda.empty_cache(): 1 after each step, 2 also after each "
                        "evaluation batch (nothing to free without CUDA)")
    g.add_argument("--wandb-project", default="", help="Weights & Biases project (needs wandb)")
    g.add_argument("--wandb-exp-name", default="", help="Weights & Biases run name")
    g.add_argument("--wandb-save-dir", default="",
                   help="local wandb directory (default: --save/wandb); WANDB_MODE=offline works "
                        "without a network")


def check_observability_args(args: argparse.Namespace, check: Callable[[bool, str], None]) -> None:
    if args.profile or args.use_pytorch_profiler:
        args.profile = True
        check(0 <= args.profile_step_start < args.profile_step_end,
              f"--profile-step-start ({args.profile_step_start}) must be >= 0 and < "
              f"--profile-step-end ({args.profile_step_end})")
    check(args.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0")
    if args.wandb_project:
        check(importlib.util.find_spec("wandb") is not None,
              "--wandb-project needs the wandb package, which is not installed (pip install wandb)")
        check(bool(args.wandb_exp_name), "--wandb-project needs --wandb-exp-name (the run name), "
                                         "as in Megatron-LM")
