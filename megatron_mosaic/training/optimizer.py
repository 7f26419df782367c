"""The optimizer's rules shared by the training code: which parameters skip weight decay,
which gradients count toward the model-parallel norm, and the learning-rate schedule.

The optimizer itself is Megatron-Core's (``megatron_optimizer.MegatronOptimizer``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases and per-head scalars (anything with fewer than 2 dims) skip decay."""
    return param.ndim < 2 or name.endswith(".bias") or getattr(param, "no_weight_decay", False)


def counts_toward_norm(param: torch.nn.Parameter) -> bool:
    """Count each distinct gradient element once across the model-parallel group.

    TP-sharded parameters are distinct on every TP rank; replicated ones (norms, most biases)
    only on TP rank 0. A pipeline-shared copy (the last stage's tied output weight) is skipped:
    its gradient equals the embedding's after ``finalize_model_grads``.
    """
    if getattr(param, "shared", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def build_scheduler(optimizer: Any, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Megatron's scheduler with Megatron-LM's lengths, counted in samples (step it by the
    global batch size): warmup from --lr-warmup-init, then constant / linear / cosine /
    inverse-square-root / WSD decay to --min-lr."""
    from megatron_mosaic.training.schedule_args import scheduler_steps

    steps = scheduler_steps(args)
    # The scheduler asserts warmup < decay; a zero-length run (or constant lr) has no decay.
    decay = max(steps["lr_decay_steps"], steps["lr_warmup_steps"] + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=steps["lr_warmup_steps"], lr_decay_steps=decay,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=max(steps["wd_incr_steps"], 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        wsd_decay_steps=steps["wsd_decay_steps"], lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
