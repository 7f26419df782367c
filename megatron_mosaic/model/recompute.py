"""Selective activation recomputation of the memories' retrievals and scans.

``--recompute-granularity selective`` with ``core_attn`` in ``--recompute-modules`` (Megatron's
default) marks, for attention, the part between the projections and the output projection.
Its Mosaic counterpart is everything a memory computes from its projections: key scans,
feature norms, value peeks, the adaptive bandwidth and the retrieval. Those intermediates are
(b, H, s, hs) float32 tensors, several per memory, while the projections that feed them are
kept: recomputing them costs no matmul. Megatron's own ``tensor_parallel.checkpoint`` does the
work (its RNG bookkeeping included), as ``Attention._checkpointed_attention_forward`` does.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


def recompute_memory_core(config: TransformerConfig) -> bool:
    """True when the config asks for the memories' cores to be recomputed in backward."""
    return config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ())


def maybe_checkpoint(enabled: bool, function: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``function(*tensors)``, its intermediates recomputed in backward when ``enabled`` (and
    gradients are on). Non-tensor inputs must be closed over by ``function``.

    Megatron's CheckpointFunction does not record autocast, and the recomputation runs in the
    backward pass, outside the forward step's autocast region: the autocast state of the
    forward is captured here and re-entered, so both passes compute the same values.
    """
    if not enabled or not torch.is_grad_enabled():
        return function(*tensors)
    device_type = tensors[0].device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)

    def run(*inputs: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=autocast_on):
            return function(*inputs)

    return tensor_parallel.checkpoint(run, False, *tensors)
