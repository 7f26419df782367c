"""AdamW over Megatron DDP gradients, with model-parallel grad-norm clipping.

Megatron's own optimizers allocate on CUDA throughout, so the step is a plain ``torch.optim.AdamW``
reading the fp32 ``param.main_grad`` that Megatron ``DistributedDataParallel`` accumulated and
``finalize_model_grads`` reduced (over data parallel, tied embeddings across pipeline stages,
and 1/num-tokens scaling). The same class runs on GPU. Weights stay fp32 (bf16 is autocast),
so no loss scaling is ever needed.
"""

from __future__ import annotations

import argparse
import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def _named_parameters(model_chunks: Iterable[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                yield name, param


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


class MosaicOptimizer:
    """``torch.optim.AdamW`` + clipping, with Megatron-style sharded (re-shardable) state dicts."""

    format = "mosaic-adamw"
    sharded = False

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if t.dim() > 0)

    def __init__(self, model_chunks: list[torch.nn.Module], args: argparse.Namespace):
        self.model_chunks = model_chunks
        self.clip_grad = args.clip_grad
        decay, no_decay = [], []
        for name, param in _named_parameters(model_chunks):
            (no_decay if is_no_decay(name, param) else decay).append(param)
        # The scheduler sets each group's weight_decay to weight_decay * wd_mult every step.
        groups = [{"params": decay, "wd_mult": 1.0, "name": "decay"},
                  {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"}]
        if getattr(args, "optimizer", "adam") == "sgd":  # Megatron-LM's sgd: L2 weight decay
            self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.sgd_momentum,
                                             weight_decay=args.weight_decay, foreach=False)
        else:
            self.optimizer = torch.optim.AdamW(
                groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                weight_decay=args.weight_decay, foreach=False,
            )

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()  # Megatron DDP: main_grad buffers
        self.optimizer.zero_grad(set_to_none=True)

    def _attach_main_grads(self) -> list[torch.nn.Parameter]:
        params = []
        for param in self.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
            params.append(param)
        return params

    def grad_norm(self) -> float:
        """L2 norm of the full model's gradient (all TP and PP shards counted once)."""
        params = [p for p in self._attach_main_grads() if counts_toward_norm(p)]
        local = torch.zeros((), dtype=torch.float64, device=self._device())
        for param in params:
            local += param.grad.detach().double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(local, group=parallel_state.get_model_parallel_group())
        return math.sqrt(local.item())

    def step(self) -> float:
        """Clip and step. Returns the pre-clip grad norm; does not step when it is not finite."""
        params = self._attach_main_grads()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return norm  # the caller stops the run; weights stay untouched
        if self.clip_grad > 0.0:
            coeff = self.clip_grad / (norm + 1.0e-6)
            if coeff < 1.0:
                for param in params:
                    param.grad.mul_(coeff)
        self.optimizer.step()
        return norm

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    # ---- checkpointing -------------------------------------------------------------------
    def _init_state(self) -> None:
        """Create zero Adam moments (SGD momentum buffers) so a sharded load has tensors to fill."""
        sgd = isinstance(self.optimizer, torch.optim.SGD)
        for param in self.parameters():
            state = self.optimizer.state[param]
            if sgd and not state and self.optimizer.defaults["momentum"]:
                # A zero buffer gives SGD's first step exactly (dampening 0): buf = 0*m + grad.
                state["momentum_buffer"] = torch.zeros_like(param)
            elif not sgd and not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict: ShardedStateDict,
                           is_loading: bool = False) -> dict:
        """Each Adam moment becomes a ShardedTensor shaped like its parameter's, so a load can
        use any DP/TP/PP layout. The step count (shared by all parameters) is common state.
        ``is_loading`` is accepted for Megatron API parity (state is always materialised)."""
        # Zero moments before the first step are what AdamW would create itself, so making them
        # explicit changes nothing and gives every checkpoint the same structure.
        self._init_state()
        state_dict = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        steps = {float(s["step"]) for s in state_dict["state"].values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"Adam step differs across parameters: {sorted(steps)}")
        optim_state_to_sharding_state(state_dict, id_map, exclude_keys=("step",))
        state_dict["common_step"] = steps.pop() if steps else 0.0
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        step = state_dict.pop("common_step")
        for param_state in state_dict["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state_dict)


def build_scheduler(optimizer: MosaicOptimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
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
