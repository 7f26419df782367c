"""Megatron-Core's own optimizer for every run (``get_megatron_optimizer``).

Without ``--use-distributed-optimizer`` it is Megatron's ``FP32Optimizer`` (fp32 weights) or
``Float16OptimizerWithFloat16Params`` (``--bf16``: fp32 main copies of the bf16 weights); with
it, ``DistributedOptimizer``: master weights and Adam moments sharded over the data-parallel
(x context-parallel) group, gradients reduce-scattered into each rank's shard, parameters
all-gathered after the step. Without TE/Apex megatron-core steps torch's AdamW/SGD (on CUDA
torch picks its multi-tensor ``foreach`` kernels by default); ``megatron_patches`` fixes that
fallback's checkpoint bugs and ``cuda_compat`` bridges its CUDA assumptions on the CPU.

This wrapper gives the training loop and the scheduler their interface (``zero_grad``,
``step`` returning the pre-clip gradient norm, ``param_groups``) and keeps the loop's contract
that a non-finite gradient norm leaves the weights untouched.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Iterator

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_mosaic.training import megatron_patches
from megatron_mosaic.training.optimizer import is_no_decay

# Distributed-optimizer checkpoints: each parameter's master weight and moments stored shaped
# like the parameter (gathered on DP rank 0 at save), so they load at any DP, TP or PP layout.
DISTRIBUTED_SHARDING = "fully_reshardable"


def checkpoint_format(use_distributed_optimizer: bool, bf16: bool = False) -> str:
    """The name stored with a checkpoint's optimizer state (``loads_formats`` says which a run
    can load). The distributed format holds fp32 main weights whatever the model's dtype."""
    if use_distributed_optimizer:
        return f"megatron-distributed-{DISTRIBUTED_SHARDING}"
    return "megatron-bf16" if bf16 else "megatron"


# Formats with Adam moments per parameter but no fp32 main weights (the weights were fp32).
_FP32_FORMATS = ("megatron", "mosaic-adamw")
# Megatron's plain optimizer (fp32 weights, or bf16 with fp32 main copies saved beside them).
_PLAIN_FORMATS = ("megatron", "megatron-bf16")
_DISTRIBUTED_FORMAT = checkpoint_format(True)
# The request for a checkpoint of the other optimizer sits under this key of the optimizer's
# part: the loaded dict is the saved one's non-tensor part merged with the request, and the
# saved structure has no such key to collide with.
_CROSS = "cross_format_state"


def _no_decay_overrides() -> dict:
    """Our no-decay rule (norms, biases, per-head scalars: ``optimizer.is_no_decay``) as
    Megatron's param-group override; it replaces Megatron's default (1-D or ``.bias``)."""
    key = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="mosaic_no_decay", fn=lambda param, name: is_no_decay(name, param)))
    return {key: ParamGroupOverride(wd_mult=0.0)}


def _init_sgd_state(optimizer: torch.optim.Optimizer, config: Any = None) -> None:
    """Zero momentum buffers, so a checkpoint load has tensors to fill. SGD's first step is
    the same with them (dampening 0: buffer = 0 * momentum + grad)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if group["momentum"] and not optimizer.state[param]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)


class MegatronOptimizer:
    """Megatron's optimizer over Megatron DDP chunks (``model_builder.wrap_for_training``)."""

    def __init__(self, model_chunks: list[torch.nn.Module], args: argparse.Namespace):
        megatron_patches.apply()
        self.model_chunks = model_chunks
        self.sharded = bool(getattr(args, "use_distributed_optimizer", False))
        bf16 = bool(getattr(args, "bf16", False))
        config = OptimizerConfig(
            optimizer=getattr(args, "optimizer", "adam"), lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, sgd_momentum=getattr(args, "sgd_momentum", 0.9),
            clip_grad=args.clip_grad, use_distributed_optimizer=self.sharded,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, fp16=False,
        )
        self.optimizer = get_megatron_optimizer(config, model_chunks,
                                                config_overrides=_no_decay_overrides())
        for optimizer in self._optimizers():
            if optimizer.init_state_fn is None:  # megatron-core 0.16.1 gives SGD none: no load
                optimizer.init_state_fn = _init_sgd_state
        self.bf16 = bf16
        self.format = checkpoint_format(self.sharded, bf16)
        # Checkpoints of the torch AdamW used before: same per-parameter moment tensors (keys
        # "optimizer.state.exp_avg.<parameter>"), only the common part is converted on load.
        # An fp32 checkpoint continues under --bf16: its weights (loaded first) become the main
        # parameters, rounded once to bf16 precision.
        single = len(self._optimizers()) == 1 and config.optimizer == "adam"
        convertible = not self.sharded and single
        # The distributed and the plain optimizer store the same model-shaped moments (keys
        # "optimizer.state.exp_avg.<parameter>"); only the step, the fp32 main weights and the
        # structure around them differ, which ``_cross_request``/``_load_cross`` translate. Only
        # Adam, and one optimizer: the distributed state is indexed by position in its buffers.
        crossing = (_PLAIN_FORMATS if self.sharded else (_DISTRIBUTED_FORMAT,)) if single else ()
        self.loads_formats = (self.format,) + (_FP32_FORMATS if convertible else ()) + crossing

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's trained parameters (their ``main_grad`` is what the step reads)."""
        for chunk in self.model_chunks:
            for param in chunk.parameters():
                if param.requires_grad:
                    yield param

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self) -> float:
        """Clip and step as Megatron's ``step`` does; returns the pre-clip gradient norm. A
        non-finite norm returns before the update, leaving weights and state untouched."""
        from megatron.core.optimizer import optimizer as optimizer_module  # CPU-patched name

        if self.optimizer.prepare_grads():  # an fp16 loss-scale overflow (not used here)
            return float("nan")
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return norm
        for optimizer in self._optimizers():  # as ChainedOptimizer.step: one norm for all
            config, params = optimizer.config, optimizer.get_parameters()
            if config.clip_grad > 0.0 and params:
                optimizer_module.clip_grad_by_total_norm_fp32(
                    params, config.clip_grad, norm,
                    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return norm

    def _optimizers(self) -> list:
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (its Adam moments / momentum buffers)."""
        total = 0
        for optimizer in self._optimizers():
            for state in optimizer.optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values()
                             if torch.is_tensor(t) and t.dim() > 0)
        return total

    # ---- checkpointing -------------------------------------------------------------------
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           saved_format: str = "") -> Any:
        """What to save, or (``is_loading``) what to request from a checkpoint of ``saved_format``."""
        if is_loading and saved_format != self.format and (
                saved_format == _DISTRIBUTED_FORMAT or (self.sharded and saved_format in _PLAIN_FORMATS)):
            return {_CROSS: self._cross_request(model_sharded_state_dict, saved_format)}
        if self.sharded:
            return self.optimizer.sharded_state_dict(
                model_sharded_state_dict, is_loading,
                metadata={"distrib_optim_sharding_type": DISTRIBUTED_SHARDING})
        state = self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading)
        if is_loading and self.bf16 and saved_format in _FP32_FORMATS:
            return state["optimizer"]  # moments only: there are no fp32 main weights to load
        return state

    def load_state_dict(self, state_dict: Any, saved_format: str = "") -> None:
        if isinstance(state_dict, dict) and _CROSS in state_dict:
            return self._load_cross(state_dict, saved_format)
        if saved_format == "mosaic-adamw":
            state_dict = self._from_mosaic_adamw(state_dict)
        if self.bf16 and saved_format in _FP32_FORMATS:
            groups = self._optimizers()[0].float16_groups  # the model's (loaded) bf16 weights
            state_dict = {"optimizer": state_dict,
                          "fp32_from_fp16_params": [[p.detach().float() for p in g] for g in groups]}
        self.optimizer.load_state_dict(state_dict)

    def _from_mosaic_adamw(self, state_dict: dict) -> dict:
        """The old optimizer's state as Megatron's FP32Optimizer state: the moments were loaded
        into this optimizer's own structure already; its step moves into ``state`` (Megatron's
        place for it) and the param groups are this run's (the scheduler sets lr and decay)."""
        step = state_dict.pop("common_step", 0.0)
        fresh = self.optimizer.state_dict()  # one optimizer (loads_formats)
        state_dict["param_groups"] = (fresh["optimizer"] if self.bf16 else fresh)["param_groups"]
        if step and any("exp_avg" in s for s in state_dict["state"].values()):
            state_dict["state"]["common_step"] = torch.tensor(float(step))
        return state_dict

    # ---- checkpoints of the other optimizer (distributed <-> plain) --------------------------
    def _main_params(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(model parameter, fp32 main parameter) pairs of the plain optimizer; the two are one
        tensor where the weights are fp32."""
        optimizer = self._optimizers()[0]
        if hasattr(optimizer, "float16_groups"):  # Float16OptimizerWithFloat16Params (--bf16)
            pairs = [(m, f) for mg, fg in zip(optimizer.float16_groups,
                                              optimizer.fp32_from_float16_groups)
                     for m, f in zip(mg, fg)]
            return pairs + [(p, p) for g in optimizer.fp32_from_fp32_groups for p in g]
        return [(p, p) for g in optimizer.optimizer.param_groups for p in g["params"]]

    def _distributed_params(self) -> list[torch.nn.Parameter]:
        """Model parameters in the order of the distributed optimizer's ``param_state`` indices
        (``sharded_param_state_fully_reshardable``: buffer by buffer, each in index-map order)."""
        return [p for buffer in self._optimizers()[0].buffers for p in buffer.param_index_map]

    def _cross_request(self, model_sharded_state_dict: dict, saved_format: str) -> dict:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
        from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

        one = self._optimizers()[0]  # the only one (loads_formats)
        if self.sharded:
            # This optimizer's own request (it allocates the state), the fp32 main weights
            # renamed to where the plain optimizer kept them: "fp32_param" under --bf16; an fp32
            # run saved none (they were the weights, loaded with the model: _load_cross).
            request = one.sharded_state_dict(
                model_sharded_state_dict, True,
                metadata={"distrib_optim_sharding_type": DISTRIBUTED_SHARDING})["param_state"]
            for tensors in request.values():
                main = tensors.pop("param")
                if saved_format == "megatron-bf16":
                    tensors["param"] = _replace_key(main, "optimizer.state.param.",
                                                   "optimizer.state.fp32_param.")
            return request
        # Plain optimizer, distributed checkpoint: moments (and fp32 main weights under --bf16)
        # stored shaped like the parameter under the same keys a plain save would give them.
        one.init_state_fn(one.optimizer, one.config)
        model, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        by_param = {id(sh.data): sh for sh in nested_values(model)}
        request = {}
        for index, (model_param, main_param) in enumerate(self._main_params()):
            names = ("exp_avg", "exp_avg_sq") + (("param",) if main_param is not model_param else ())
            request[index] = {name: make_sharded_optimizer_tensor(
                by_param[id(model_param)], torch.empty_like(main_param, dtype=torch.float32),
                f"optimizer.state.{name}") for name in names}
        return request

    def _load_cross(self, state_dict: dict, saved_format: str) -> None:
        loaded = state_dict[_CROSS]
        step = _saved_step(state_dict, saved_format)
        one = self._optimizers()[0]  # the only one (loads_formats)
        if self.sharded:
            fresh = one.state_dict()
            for group in fresh["optimizer"]["param_groups"]:
                group["step"] = step  # where this optimizer keeps torch Adam's shared step
            for index, model_param in enumerate(self._distributed_params()):
                # An fp32 plain checkpoint's main weights are the model's (loaded already).
                loaded[index].setdefault("param", model_param.detach().float())
            fresh["param_state"] = loaded
            fresh["param_state_sharding_type"] = DISTRIBUTED_SHARDING
            one.load_state_dict(fresh)
            return
        inner = one.optimizer
        for index, (model_param, main_param) in enumerate(self._main_params()):
            tensors = loaded[index]
            if "param" in tensors:
                main_param.data.copy_(tensors["param"])
            state = inner.state[main_param]
            state["exp_avg"].copy_(tensors["exp_avg"])
            state["exp_avg_sq"].copy_(tensors["exp_avg_sq"])
            # torch's Adam keeps a step tensor per parameter and increments it in place:
            # each its own (megatron_patches: shared_step).
            state["step"] = torch.tensor(step, dtype=torch.float32)


def _replace_key(sharded: Any, old_prefix: str, new_prefix: str) -> Any:
    """``sharded`` (a ShardedTensor or factory) under the key with ``old_prefix`` replaced."""
    from dataclasses import replace

    assert sharded.key.startswith(old_prefix), sharded.key
    return replace(sharded, key=new_prefix + sharded.key[len(old_prefix):])


def _saved_step(state_dict: dict, saved_format: str) -> float:
    """The Adam step of a checkpoint: the distributed optimizer keeps it in its param groups,
    the plain one as ``common_step`` in its state (absent before the first step)."""
    from megatron_mosaic.training.checkpoint_state import CheckpointMismatchError  # one-line error

    try:
        if saved_format == _DISTRIBUTED_FORMAT:
            steps = {float(g["step"]) for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        else:
            inner = state_dict["optimizer"] if saved_format == "megatron-bf16" else state_dict
            steps = {float(inner["state"].get("common_step", 0.0))}
    except (KeyError, TypeError) as err:  # e.g. saved by several chained optimizers
        raise CheckpointMismatchError(f"the {saved_format} optimizer state has no single Adam step where one "
                         f"optimizer keeps it ({err!r}); pass --no-load-optim") from None
    if len(steps) != 1:
        raise CheckpointMismatchError(f"the {saved_format} optimizer state holds steps {sorted(steps)}; "
                         f"pass --no-load-optim")
    return steps.pop()
