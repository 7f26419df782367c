"""Shared plumbing of the Mosaic modules: TP-split per-head parameters, checkpoint sharding,
head reshapes and the norm builder."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none
from torch import Tensor


def param_device(config: TransformerConfig) -> torch.device:
    """Where Megatron's own layers put their weights for this config."""
    if not config.use_cpu_initialization and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MosaicModule(MegatronModule):
    """MegatronModule whose direct parameters may be split across TP ranks.

    A direct parameter marked with Megatron's tensor-parallel attributes
    (``tensor_model_parallel=True``, ``partition_dim``) is checkpointed as a TP-sharded
    ShardedTensor on that axis; the others are replicated. Children are handled by their own
    ``sharded_state_dict`` (Megatron linears, MLP, other MosaicModules).
    """

    def __init__(self, config: TransformerConfig, tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp_rank = get_pg_rank(self.tp_group)
        self.tp_size = get_pg_size(self.tp_group)

    def per_head_parameter(self, full: Tensor) -> torch.nn.Parameter:
        """Parameter holding this TP rank's heads of ``full`` (first dim = all H heads).

        Inits that depend on the head index are built for all heads (from the same seeded RNG on
        every rank) and sliced here, so TP=1 and TP=n models start from the same values.
        """
        if full.shape[0] % self.tp_size:
            raise ValueError(f"{full.shape[0]} heads cannot be split over {self.tp_size} TP ranks")
        local = full.chunk(self.tp_size, dim=0)[self.tp_rank]
        param = torch.nn.Parameter(
            local.detach().clone().to(device=param_device(self.config), dtype=self.config.params_dtype)
        )
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        return param

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Own parameters sharded by their TP attributes; children recurse."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis_map = {
            name: param.partition_dim
            for name, param in self.named_parameters(recurse=False)
            if getattr(param, "tensor_model_parallel", False)
        }
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, axis_map, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        for name, module in self.named_children():
            sharded.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group)
            )
        return sharded


def gather_sequence(x: Tensor, config: TransformerConfig, tp_group) -> Tensor:
    """[s/TP, b, d] -> [s, b, d] under sequence parallelism (backward: reduce-scatter), else x.
    Every memory needs the whole (context-parallel local) sequence, as attention does."""
    if not config.sequence_parallel:
        return x
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp_group)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[s, b, H·hs] -> (b, H, s, hs)."""
    s, b, _ = x.shape
    return x.view(s, b, num_heads, -1).permute(1, 2, 0, 3)


def merge_heads(y: Tensor) -> Tensor:
    """(b, H, s, hs) -> [s, b, H·hs]."""
    b, h, s, hs = y.shape
    return y.permute(2, 0, 1, 3).reshape(s, b, h * hs)


class MosaicNorm:
    """Builds the block norms: LayerNorm (bias iff ``add_bias_linear``, like the official
    nanoMosaics LayerNorm) or RMSNorm, from ``config.normalization``.

    A class (not a function) because Megatron's ``build_module`` returns functions uncalled.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(
                hidden_size, eps=eps, bias=bool(config.add_bias_linear), device=param_device(config),
                dtype=config.params_dtype,
            )
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, device=param_device(config), dtype=config.params_dtype)
        else:
            raise ValueError(f"config.normalization must be 'LayerNorm' or 'RMSNorm', got {config.normalization!r}")
        for param in norm.parameters():
            # Under sequence parallelism each TP rank normalises other tokens: Megatron's
            # finalize_model_grads sums the gradients of parameters marked so across TP.
            param.sequence_parallel = config.sequence_parallel
        return norm
