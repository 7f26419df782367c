"""Key and value extractors (spec sections 2-3), heads split across tensor-parallel ranks.

The extractors hold the per-head parameters and the math after the projections; the
projections themselves (W_k / W_φ, W_g, W_λ, W_v) are one fused column-parallel GEMM owned by
the memory (model/fused_projection.py), whose pieces for this rank's heads they receive.
Projected inputs are [s, b, H_local·w]; per-head outputs are (b, H_local, s, hs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from ..memory.features import finish_values, gated_unit_keys, leaky_keys
from ..parallel.dispatch import linear_recurrence, peek_values  # memory math, CP-aware when CP > 1
from .config import MosaicConfig
from .context import MemoryContext
from .module import MosaicModule, split_heads


@dataclass
class MemoryLinears:
    """Which parallel linear classes the memory modules build (local Megatron or TE)."""

    column: type = ColumnParallelLinear
    row: type = RowParallelLinear


def column_linear(
    linears: MemoryLinears, config: MosaicConfig, in_size: int, out_size: int, init_method: Callable,
    bias: bool, tp_group,
):
    """A head-split projection: output channels of this rank's heads only.

    Under sequence parallelism the memory gathers its input once (``gather_sequence``) for all
    of its projections, whose backward reduce-scatters (sums) their input gradients: these
    linears must neither gather again nor all-reduce that gradient themselves. They get a config
    copy with ``sequence_parallel`` off and ``disable_grad_reduce`` (the output projection keeps
    sequence parallelism, and reduce-scatters its output)."""
    extra = {}
    if config.sequence_parallel:
        if not issubclass(linears.column, ColumnParallelLinear):
            raise NotImplementedError("sequence parallelism in Mosaic memories needs the local "
                                      "(Megatron-Core) linears, not Transformer Engine's")
        config = copy.copy(config)
        config.sequence_parallel = False
        extra["disable_grad_reduce"] = True
    return linears.column(
        in_size, out_size, config=config, init_method=init_method, gather_output=False, bias=bias,
        skip_bias_add=False, is_expert=False, tp_group=tp_group, **extra,
    )


def row_linear(
    linears: MemoryLinears, config: MosaicConfig, in_size: int, out_size: int, init_method: Callable,
    bias: bool, tp_group,
):
    """The output projection over the heads of all ranks (all-reduce inside)."""
    return linears.row(
        in_size, out_size, config=config, init_method=init_method, bias=bias, input_is_parallel=True,
        skip_bias_add=False, is_expert=False, tp_group=tp_group,
    )


class LeakyKeyExtractor(MosaicModule):
    """v1 key: k_t = Norm(Σ_{s≤t} e^{-λ(t-s)} W_k x_s) · exp(min(pow·10κ, key_scale_max)).

    leak θ (H,): λ = |10θ|, init linspace(0.5, 5, H)/10. key_scale κ (H,): init 0.1.
    ``scale_pow`` is 1 for the contextual memory (query and stored copies are both scaled) and
    2 for the persistent memory (its stored keys carry no scale).
    """

    def __init__(self, config: MosaicConfig, scale_pow: int, tp_group=None):
        super().__init__(config, tp_group)
        heads = config.num_attention_heads
        self.scale_pow = scale_pow
        self.num_local_heads = heads // self.tp_size
        self.leak = self.per_head_parameter(torch.linspace(0.5, 5.0, heads) / 10.0)
        self.key_scale = self.per_head_parameter(torch.full((heads,), 0.1))

    def features(self, projected: Tensor, context: MemoryContext, dtype: torch.dtype) -> Tensor:
        """W_k x [s, b, H_local·hs] -> scaled unit keys (b, H_local, s, hs) in ``dtype`` (the
        leaky scan and key features)."""
        raw = split_heads(projected, self.num_local_heads).float()
        decay = (10.0 * self.leak.float()).abs().view(1, -1, 1, 1)
        scaled, log_scale, _ = linear_recurrence(raw, log_decay=-decay, resets=context.resets,
                                                 group=context.cp_group)
        keys = leaky_keys(scaled, log_scale, self.key_scale, self.scale_pow, self.config.v1_key_scale_max)
        return keys.to(dtype)


class GatedKeyExtractor(MosaicModule):
    """v2 key: k̄_t = g_t W_φ x_t + λ_t k̄_{t-1}, g_t = exp(W_g x_t), λ_t = exp(-|W_λ x_t|);
    k_t = Norm(k̄_t), a unit vector (the bandwidth is applied to the query copy later)."""

    def __init__(self, config: MosaicConfig, tp_group=None):
        super().__init__(config, tp_group)
        self.num_local_heads = config.num_attention_heads // self.tp_size

    def features(self, key: Tensor, gate: Tensor, decay: Tensor, context: MemoryContext,
                 dtype: torch.dtype, heads: int | None = None, bandwidth: Tensor | None = None):
        """(W_φ x, W_g x, W_λ x) -> unit keys (b, heads, s, hs) in ``dtype`` (the gated scan
        and norm). ``heads`` (default H_local): the inputs hold that many heads side by side,
        e.g. two memories' (the extractor has no parameters, every head's math is the same).
        ``bandwidth`` β (b, heads, s, 1): also return the query copy keys·β, (keys, queries),
        from the same pass over the keys."""
        raw = split_heads(key, heads or self.num_local_heads).float()
        log_gain = gate.float().permute(1, 2, 0).unsqueeze(-1)  # (b, H_local, s, 1)
        log_decay = -decay.float().abs().permute(1, 2, 0).unsqueeze(-1)
        scaled, _, _ = linear_recurrence(raw, log_decay=log_decay, log_gain=log_gain, resets=context.resets,
                                         group=context.cp_group)
        if bandwidth is None:
            return gated_unit_keys(scaled).to(dtype)
        keys, queries = gated_unit_keys(scaled, bandwidth)
        return keys.to(dtype), queries.to(dtype)


class ValueExtractor(MosaicModule):
    """Value: v_t = Norm(c_h ṽ_t + (1 - c_h) ṽ_{t+1}) · scale_h with ṽ = W_v x, c_h ~ U(0, 1).

    v1 (official): value_scale ν init -0.05, scale = exp(10ν).
    v2 (paper):    value_scale θ init 0,     scale = exp(clamp(θ, -15, 15)), so a_h starts at 1
    and trains (see memory.features.value_scale for why old checkpoints are unaffected).
    """

    def __init__(self, config: MosaicConfig, tp_group=None):
        super().__init__(config, tp_group)
        heads = config.num_attention_heads
        self.version = config.mosaic_version
        self.num_local_heads = heads // self.tp_size
        self.mix = self.per_head_parameter(torch.rand(heads))
        self.value_scale = self.per_head_parameter(torch.full((heads,), -0.05 if self.version == 1 else 0.0))

    def features(self, projected: Tensor, context: MemoryContext, dtype: torch.dtype,
                 others: tuple[ValueExtractor, ...] = ()) -> Tensor:
        """W_v x [s, b, H_local·hs] -> values (b, H_local, s, hs) in ``dtype`` (the peek mix,
        norm and scale). ``others``: extractors whose heads follow this one's in ``projected``
        (``value_features``)."""
        return value_features(projected, [self, *others], context, dtype)


def value_features(projected: Tensor, extractors: list[ValueExtractor], context: MemoryContext,
                   dtype: torch.dtype) -> Tensor:
    """Values of several extractors' heads side by side in one pass: W_v x [s, b, ΣH_local·hs]
    -> (b, ΣH_local, s, hs), each head with its extractor's mix and scale (one peek and norm for
    both v2 memories: eager, every op is a dispatch)."""
    heads = sum(e.num_local_heads for e in extractors)
    mix = torch.cat([e.mix for e in extractors]) if len(extractors) > 1 else extractors[0].mix
    theta = torch.cat([e.value_scale for e in extractors]) if len(extractors) > 1 else extractors[0].value_scale
    raw = split_heads(projected, heads).float()
    mixed = peek_values(raw, mix.float().view(1, -1, 1, 1), resets=context.resets, group=context.cp_group)
    return finish_values(mixed, theta, extractors[0].version).to(dtype)
