"""The one place where megatron-core's CUDA assumptions are bridged to the CPU.

megatron-core 0.16 has no CPU path: a few call sites hard-code the GPU. On a machine without
CUDA this module makes these work on the CPU so the same training loop (Megatron DDP,
``finalize_model_grads``, pipeline schedules, ``dist_checkpointing``) runs on gloo:

1. ``torch.cuda.current_device()`` -> ``"cpu"``. Megatron allocates p2p shape/receive buffers
   (``pipeline_parallel/p2p_communication.py``), grad buffers (``distributed/param_and_grad_buffer.py``)
   and ``GlobalMemoryBuffer`` tensors with ``device=torch.cuda.current_device()``.
2. ``torch.cuda.synchronize()`` -> no-op. Called by p2p communication and checkpoint saving;
   there is nothing to synchronise on the CPU.
3. ``device="cuda"`` literals in ``pipeline_parallel/schedules.py`` (``total_num_tokens =
   torch.zeros([], device="cuda")`` in all three schedules): the module's ``torch`` name is
   replaced by a thin proxy whose tensor factories map ``"cuda"`` to the CPU. Only that module
   sees the proxy.

4. ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")`` on the tensor-parallel linear
   autograd functions (``tensor_parallel/layers.py``): their backward replays the forward's
   *CUDA* autocast state, so under CPU autocast (``--bf16``) the backward mixes a bf16 output
   gradient with fp32 weights and fails. Re-decorated with ``device_type="cpu"``.

5. ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` in ``tensor_parallel/random.py``: Megatron's
   activation checkpointing (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``) saves
   and restores the CUDA generator around the recomputation, which asserts without CUDA. On the
   CPU there is no CUDA generator to keep; the CPU generator and the RNG tracker are still saved
   and restored by the same code.

6. ``device="cuda"`` literals in Megatron's optimizers (``optimizer/optimizer.py`` dummy overflow
   buffer and unit scale, ``optimizer/clip_grads.py``, ``core/utils.py``'s local multi-tensor
   l2 norm): the same ``torch`` proxy as for the schedules, in those three modules.
7. ``param.type() == 'torch.cuda.FloatTensor'`` checks in ``DistributedOptimizer.
   _build_model_and_main_param_groups``, ``Float16OptimizerWithFloat16Params.__init__`` (``--bf16``)
   and ``clip_grad_by_total_norm_fp32``: the functions
   are recompiled from their own source with the CPU type names (no other change), and
   ``optimizer.py``'s imported name of the latter is rebound.
8. ``send_tensor.cuda()`` in ``DistributedOptimizer.get_parameter_state_dp_zero`` (the gather
   of the optimizer state on DP rank 0 behind ``fully_reshardable`` checkpoints): recompiled
   the same way with ``.to(torch.cuda.current_device())``, i.e. the CPU under patch 1.

Nothing is patched when CUDA is available: GPU runs use megatron-core untouched. Every patch is
shown to still be needed by ``tests/training/test_cuda_compat.py`` (the unpatched call fails on
CPU); when an upgrade makes one unnecessary that test fails and the patch should be dropped.
"""

from __future__ import annotations

import inspect
import textwrap
import types
from typing import Any

import torch

from megatron_mosaic.training.patch_set import PatchSet

# The megatron-core version these patches were written and tested against.
TESTED_MEGATRON_CORE_VERSIONS = ("0.16.1",)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")


def _cpu_current_device() -> str:
    return "cpu"


def _noop_synchronize(device: Any = None) -> None:
    return None


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by ``schedules.py``: identical except ``device="cuda"`` means CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)
            return factory
        return attr


PATCHES = ("current_device", "synchronize", "schedules", "linear_autocast", "checkpoint_rng",
           "optimizer_devices", "optimizer_type_checks", "optimizer_gather_device")


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


_CPU_TYPE_NAMES = {"'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
                   "'torch.cuda.HalfTensor'": "'torch.HalfTensor'",
                   "'torch.cuda.BFloat16Tensor'": "'torch.BFloat16Tensor'",
                   # only in get_parameter_state_dp_zero (patch 8)
                   "send_tensor.cuda()": "send_tensor.to(torch.cuda.current_device())",
                   # Float16OptimizerWithFloat16Params.__init__, compiled outside its class
                   "super().__init__(": "MixedPrecisionOptimizer.__init__(self, "}
_recompiled: dict[str, Any] = {}


def _with_cpu_type_names(function: Any) -> Any:
    """``function`` recompiled from its source with the CUDA tensor-type names of its
    ``param.type()`` checks replaced by the CPU ones, or its ``.cuda()`` moves by moves to the
    current device (built once, in its own module's globals)."""
    key = f"{function.__module__}.{function.__qualname__}"
    if key not in _recompiled:
        source = textwrap.dedent(inspect.getsource(function))
        for cuda_name, cpu_name in _CPU_TYPE_NAMES.items():
            source = source.replace(cuda_name, cpu_name)
        namespace: dict[str, Any] = {}
        exec(compile(source, inspect.getsourcefile(function), "exec"), function.__globals__, namespace)
        _recompiled[key] = namespace[function.__name__]
    return _recompiled[key]


def _cpu_autocast_function(cls: type) -> type:
    """A subclass of a Megatron autograd Function whose forward/backward follow CPU autocast."""
    forward = torch.amp.custom_fwd(cls.forward.__wrapped__, device_type="cpu")
    backward = torch.amp.custom_bwd(cls.backward.__wrapped__, device_type="cpu")
    return type(cls.__name__, (cls,), {"forward": staticmethod(forward),
                                       "backward": staticmethod(backward),
                                       "__module__": __name__})


_linear_functions: dict[str, type] = {}


def _cpu_linear_functions() -> dict[str, type]:
    from megatron.core.tensor_parallel import layers

    if not _linear_functions:  # built once: Function subclasses are registered globally
        for name in ("LinearWithGradAccumulationAndAsyncCommunication", "LinearWithFrozenWeight"):
            _linear_functions[name] = _cpu_autocast_function(getattr(layers, name))
    return _linear_functions


def _targets() -> dict[str, list[tuple[Any, str, Any]]]:
    """patch name -> [(object, attribute, CPU replacement)]."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as optimizer_module
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as tp_random

    if not _recompiled:  # from the unpatched functions, before the first apply()
        _with_cpu_type_names(distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups)
        _with_cpu_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        _with_cpu_type_names(distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero)
        _with_cpu_type_names(optimizer_module.Float16OptimizerWithFloat16Params.__init__)
    build_groups = _recompiled["megatron.core.optimizer.distrib_optimizer."
                               "DistributedOptimizer._build_model_and_main_param_groups"]
    cpu_clip = _recompiled["megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32"]

    return {
        "current_device": [(torch.cuda, "current_device", _cpu_current_device)],
        "synchronize": [(torch.cuda, "synchronize", _noop_synchronize)],
        "schedules": [(schedules, "torch", _CpuDeviceTorch())],
        "linear_autocast": [(layers, name, fn) for name, fn in _cpu_linear_functions().items()],
        "checkpoint_rng": [(tp_random, "_get_cuda_rng_state", _no_cuda_rng_state),
                           (tp_random, "_set_cuda_rng_state", _no_cuda_rng_state)],
        "optimizer_devices": [(module, "torch", _CpuDeviceTorch())
                              for module in (optimizer_module, clip_grads, core_utils)],
        "optimizer_type_checks": [
            (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups",
             build_groups),  # a classmethod: its decorator is part of the recompiled source
            (clip_grads, "clip_grad_by_total_norm_fp32", cpu_clip),
            (optimizer_module, "clip_grad_by_total_norm_fp32", cpu_clip),
            (optimizer_module.Float16OptimizerWithFloat16Params, "__init__",
             _recompiled["megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__"]),
        ],
        "optimizer_gather_device": [
            (distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero",
             _recompiled["megatron.core.optimizer.distrib_optimizer."
                         "DistributedOptimizer.get_parameter_state_dp_zero"]),
        ],
    }


_patches = PatchSet("cuda_compat", PATCHES, _targets, needed=lambda: not torch.cuda.is_available(),
                    tested_versions=TESTED_MEGATRON_CORE_VERSIONS,
                    test_file="tests/training/test_cuda_compat.py")
is_active, apply, revert, unpatched = _patches.is_active, _patches.apply, _patches.revert, _patches.unpatched
