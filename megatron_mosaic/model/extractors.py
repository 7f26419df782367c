"""Key and value extractors (spec sections 2-3), heads split across tensor-parallel ranks.

Each projection is a ColumnParallelLinear with gather_output=False: rank r computes the
channels of its heads only, and every per-head parameter holds the same heads.
All inputs are [s, b, d]; per-head outputs are (b, H_local, s, hs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from ..memory import SequenceLayout
from ..memory.features import finish_values, gated_unit_keys, leaky_keys
from ..parallel.dispatch import linear_recurrence, peek_values  # memory math, CP-aware when CP > 1
from .config import MosaicConfig
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
    """A head-split projection: output channels of this rank's heads only."""
    return linears.column(
        in_size, out_size, config=config, init_method=init_method, gather_output=False, bias=bias,
        skip_bias_add=False, is_expert=False, tp_group=tp_group,
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


def _resets(layout: SequenceLayout) -> Optional[Tensor]:
    """Document starts, or None for one whole document held here (its only start, position 0,
    is a no-op reset). Under context parallelism the starts always go along: other ranks' chunks
    of the same rows may hold starts."""
    whole = layout.single_document and layout.total_length == layout.seq_len
    return None if whole else layout.resets


class LeakyKeyExtractor(MosaicModule):
    """v1 key: k_t = Norm(Σ_{s≤t} e^{-λ(t-s)} W_k x_s) · exp(min(pow·10κ, key_scale_max)).

    leak θ (H,): λ = |10θ|, init linspace(0.5, 5, H)/10. key_scale κ (H,): init 0.1.
    ``scale_pow`` is 1 for the contextual memory (query and stored copies are both scaled) and
    2 for the persistent memory (its stored keys carry no scale).
    """

    def __init__(self, config: MosaicConfig, linears: MemoryLinears, init_method: Callable, scale_pow: int, tp_group=None):
        super().__init__(config, tp_group)
        d, heads = config.hidden_size, config.num_attention_heads
        self.scale_pow = scale_pow
        self.num_local_heads = heads // self.tp_size
        self.linear_key = column_linear(linears, config, d, d, init_method, config.add_bias_linear, self.tp_group)
        self.leak = self.per_head_parameter(torch.linspace(0.5, 5.0, heads) / 10.0)
        self.key_scale = self.per_head_parameter(torch.full((heads,), 0.1))

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """x [s, b, d] -> scaled unit keys (b, H_local, s, hs) in x's dtype."""
        raw = split_heads(self.linear_key(x)[0], self.num_local_heads).float()
        decay = (10.0 * self.leak.float()).abs().view(1, -1, 1, 1)
        scaled, log_scale, _ = linear_recurrence(raw, log_decay=-decay, resets=_resets(layout))
        keys = leaky_keys(scaled, log_scale, self.key_scale, self.scale_pow, self.config.v1_key_scale_max)
        return keys.to(x.dtype)


class GatedKeyExtractor(MosaicModule):
    """v2 key: k̄_t = g_t W_φ x_t + λ_t k̄_{t-1}, g_t = exp(W_g x_t), λ_t = exp(-|W_λ x_t|);
    k_t = Norm(k̄_t), a unit vector (the bandwidth is applied to the query copy later)."""

    def __init__(self, config: MosaicConfig, linears: MemoryLinears, init_method: Callable, tp_group=None):
        super().__init__(config, tp_group)
        d, heads = config.hidden_size, config.num_attention_heads
        self.num_local_heads = heads // self.tp_size
        self.linear_key = column_linear(linears, config, d, d, init_method, False, self.tp_group)
        self.linear_gate = column_linear(linears, config, d, heads, init_method, False, self.tp_group)
        self.linear_decay = column_linear(linears, config, d, heads, init_method, False, self.tp_group)

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """x [s, b, d] -> unit keys (b, H_local, s, hs) in x's dtype."""
        raw = split_heads(self.linear_key(x)[0], self.num_local_heads).float()
        log_gain = self.linear_gate(x)[0].float().permute(1, 2, 0).unsqueeze(-1)  # (b, H_local, s, 1)
        log_decay = -self.linear_decay(x)[0].float().abs().permute(1, 2, 0).unsqueeze(-1)
        scaled, _, _ = linear_recurrence(raw, log_decay=log_decay, log_gain=log_gain, resets=_resets(layout))
        return gated_unit_keys(scaled).to(x.dtype)


class ValueExtractor(MosaicModule):
    """Value: v_t = Norm(c_h ṽ_t + (1 - c_h) ṽ_{t+1}) · scale_h with ṽ = W_v x, c_h ~ U(0, 1).

    v1 (official): value_scale ν init -0.05, scale = exp(10ν).
    v2 (paper):    value_scale θ init 0,     scale = exp(clamp(θ, -15, 15)), so a_h starts at 1
    and trains (see memory.features.value_scale for why old checkpoints are unaffected).
    """

    def __init__(self, config: MosaicConfig, linears: MemoryLinears, init_method: Callable, tp_group=None):
        super().__init__(config, tp_group)
        d, heads = config.hidden_size, config.num_attention_heads
        self.version = config.mosaic_version
        self.num_local_heads = heads // self.tp_size
        bias = config.add_bias_linear if self.version == 1 else False
        self.linear_value = column_linear(linears, config, d, d, init_method, bias, self.tp_group)
        self.mix = self.per_head_parameter(torch.rand(heads))
        self.value_scale = self.per_head_parameter(torch.full((heads,), -0.05 if self.version == 1 else 0.0))

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """x [s, b, d] -> values (b, H_local, s, hs) in x's dtype."""
        raw = split_heads(self.linear_value(x)[0], self.num_local_heads).float()
        mixed = peek_values(raw, self.mix.float().view(1, -1, 1, 1), resets=_resets(layout))
        return finish_values(mixed, self.value_scale, self.version).to(x.dtype)
