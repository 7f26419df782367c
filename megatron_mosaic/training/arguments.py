"""Command-line arguments of ``pretrain_mosaic.py``, named as in Megatron-LM where one exists.

``parse_args(argv, world_size)`` parses and validates; every invalid combination is rejected
before any work starts with a message naming the offending arguments. ``args_from_dict`` turns
the argument dict stored in a checkpoint back into a namespace (missing keys take today's
defaults) so a model can be rebuilt from a checkpoint alone.

This module is the entry point and holds the small helpers around it (the first-rank exit,
checkpoint dicts, batch arithmetic). The parser is ``argument_parser``, the derivation and
checks ``argument_checks``; their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence

# Stdlib-only modules: arguments still parse before torch/megatron are imported.
from megatron_mosaic.training.argument_checks import (
    CHECKPOINT_MODEL_ARGS,
    ArgumentError,
    validate_args,
)
from megatron_mosaic.training.argument_parser import CKPT_FORMATS, MODELS, build_parser
from megatron_mosaic.training.model_kinds import kind_of

__all__ = [
    "ArgumentError", "CHECKPOINT_MODEL_ARGS", "CKPT_FORMATS", "FIRST_RANK_GRACE_S", "MODELS",
    "args_from_dict", "args_to_dict", "build_parser", "is_first_rank", "num_microbatches",
    "parse_args", "tokens_per_iteration", "validate_args",
]


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate. Bad values exit with status 2 and a message naming the arguments."""
    parser = build_parser()
    if not is_first_rank():  # every rank parses; only the first one speaks for all of them
        parser.print_usage = parser.print_help = lambda file=None: None
        parser._print_message = lambda message, file=None: None
        parser.exit = _exit_after_first_rank
    args = parser.parse_args(argv)
    try:
        return validate_args(args, world_size)
    except ArgumentError as err:  # one line naming the arguments (the usage text is 60 lines)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
        raise  # unreachable: parser.exit exits


def _exit_after_first_rank(status: int = 0, message: Optional[str] = None) -> None:
    """A silent rank's exit: torchrun stops the other workers as soon as one exits non-zero, so
    leaving at once could kill rank 0 before it prints the message for everyone."""
    import time

    time.sleep(FIRST_RANK_GRACE_S)
    raise SystemExit(status)


# Parsing needs no torch: rank 0 prints well within this after its own start.
FIRST_RANK_GRACE_S = 5.0


def is_first_rank() -> bool:
    """Rank 0 of a launch (torchrun, SLURM, or a plain single process), before any process group
    exists: the environment's global rank."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Plain-data form of the arguments for checkpoints (tuples become lists)."""
    out = {}
    for key, value in vars(args).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def args_from_dict(saved: dict[str, Any], **overrides: Any) -> argparse.Namespace:
    """Namespace from checkpointed arguments; keys missing from ``saved`` take current defaults."""
    args = build_parser().parse_args([])
    for key, value in {**saved, **overrides}.items():
        setattr(args, key, value)
    args.long_term_delay_range = tuple(args.long_term_delay_range)
    if args.attention_dropout is None:  # as _derive: the model's default
        args.attention_dropout = kind_of(args).attention_dropout
    return args


def num_microbatches(args: argparse.Namespace) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def tokens_per_iteration(args: argparse.Namespace) -> int:
    return args.global_batch_size * args.seq_length
