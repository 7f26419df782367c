"""Megatron-Core's own optimizer for ``--use-distributed-optimizer``: master weights and Adam
moments sharded over the data-parallel (x context-parallel) group, gradients reduce-scattered
into each rank's shard, parameters all-gathered after the step.

``get_megatron_optimizer`` builds it (with Megatron's weight-decay groups: biases and 1-D
parameters, i.e. norms and per-head scalars, undecayed, as ``optimizer.is_no_decay``); on the CPU
it runs through ``cuda_compat``'s optimizer patches. This wrapper gives it the interface the
training loop and the scheduler use (``zero_grad``, ``step`` returning the pre-clip gradient
norm, ``param_groups``) and keeps the loop's contract that a non-finite gradient norm leaves
the weights untouched.
"""

from __future__ import annotations

import argparse
import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer


class DistributedMegatronOptimizer:
    """Megatron's DistributedOptimizer over Megatron DDP chunks built with
    ``use_distributed_optimizer=True`` (``model_builder.wrap_for_training``)."""

    def __init__(self, model_chunks: list[torch.nn.Module], args: argparse.Namespace):
        self.model_chunks = model_chunks
        config = OptimizerConfig(
            optimizer=getattr(args, "optimizer", "adam"), lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, sgd_momentum=getattr(args, "sgd_momentum", 0.9),
            clip_grad=args.clip_grad, use_distributed_optimizer=True,
            params_dtype=torch.float32, bf16=False, fp16=False,
        )
        self.optimizer = get_megatron_optimizer(config, model_chunks)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self) -> float:
        """Clip and step; returns the pre-clip gradient norm. A non-finite norm returns before
        Megatron's step (which would apply it): the grads are prepared and measured first, and
        Megatron's step repeats that cheap part."""
        self.optimizer.prepare_grads()
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return norm
        success, norm, _ = self.optimizer.step()
        return float(norm) if success else float("nan")

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (Adam moments of its shard)."""
        total = 0
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in optimizer.optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values()
                             if torch.is_tensor(t) and t.dim() > 0)
        return total

    def sharded_state_dict(self, *args, **kwargs):
        raise NotImplementedError(
            "checkpoints with --use-distributed-optimizer are not supported yet (megatron-core "
            "0.16.1's torch-Adam fallback shares one 'step' across parameters and fails to "
            "reload it); train without --save/--load or without --use-distributed-optimizer")
