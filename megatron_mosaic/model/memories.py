"""The memory units of a Mosaic block, heads split across tensor-parallel ranks.

v1: ContextualMemory (pairs i < t) and PersistentMemory (trained slots, replaces the FFN).
v2: AssociativeMemory (one short- or long-term memory's own parameters) and LongShortMemory
    (both, with one input GEMM and one output projection over their concatenated heads).
Inputs are [s, b, d]; outputs [s, b, d] after the RowParallelLinear (all-reduce over TP).
The projections of the same input are one fused column-parallel GEMM (model/fused_projection.py):
per v1 memory, and for both v2 memories together; its pieces go to the key and value extractors.
Under sequence parallelism inputs and outputs are [s/TP, b, d]: each memory gathers the sequence
once before its projections and the output projection reduce-scatters it again.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..memory import Visibility, adaptive_bandwidth
from ..memory.features import exp10_scale
from ..parallel.dispatch import associative_recall  # CP ring when CP > 1
from .config import MosaicConfig
from .context import MemoryContext
from .extractors import (
    GatedKeyExtractor, LeakyKeyExtractor, MemoryLinears, ValueExtractor, row_linear,
)
from .fused_projection import FusedProjection, Part
from .module import MosaicModule, gather_sequence, merge_heads
from .recompute import maybe_checkpoint, recompute_memory_core


def recall(queries: Tensor, keys: Tensor, values: Tensor, visibility: Visibility, context: MemoryContext) -> Tensor:
    """associative_recall over one sequence: unmasked when the context says this rank holds one
    whole document, the ring over ``context.cp_group`` under context parallelism."""
    layout = context.recall_layout
    return associative_recall(queries, keys, values, visibility, layout, layout, group=context.cp_group)


class ContextualMemory(MosaicModule):
    """v1 contextual memory: y_t = Σ_{i<t} softmax_i(k_t·k_i) v_i, then W_o (official ContextMem)."""

    def __init__(self, config: MosaicConfig, submodules: MemoryLinears, init_method: Callable,
                 output_init_method: Callable, tp_group=None):
        super().__init__(config, tp_group)
        d, hs = config.hidden_size, config.head_dim
        # Built first: its parts are drawn in the order the separate linears were (key, value).
        self.projection = FusedProjection(
            config, submodules, [Part("key_extractor.linear_key", hs), Part("value_extractor.linear_value", hs)],
            init_method, config.add_bias_linear, tp_group=self.tp_group)
        self.key_extractor = LeakyKeyExtractor(config, scale_pow=1, tp_group=self.tp_group)
        self.value_extractor = ValueExtractor(config, tp_group=self.tp_group)
        self.linear_proj = row_linear(submodules, config, d, d, output_init_method, config.add_bias_linear, self.tp_group)

    def forward(self, x: Tensor, context: MemoryContext) -> Tensor:
        x = gather_sequence(x, self.config, self.tp_group)

        def core(key: Tensor, value: Tensor) -> Tensor:  # recomputed under selective recompute
            keys = self.key_extractor.features(key, context, x.dtype)
            values = self.value_extractor.features(value, context, x.dtype)
            return recall(keys, keys, values, Visibility(delay=1), context)

        y = maybe_checkpoint(recompute_memory_core(self.config), core, *self.projection(x))
        return self.linear_proj(merge_heads(y))[0]


class PersistentMemory(MosaicModule):
    """v1 persistent memory: y = softmax(k·M_kᵀ) M_v · exp(10ν'), then W_o (official PersistentMem
    with one slot bank). memory_keys / memory_values: (H_local, P, hs), init N(0, 1/√hs)."""

    def __init__(self, config: MosaicConfig, submodules: MemoryLinears, init_method: Callable,
                 output_init_method: Callable, tp_group=None):
        super().__init__(config, tp_group)
        d, heads, hs = config.hidden_size, config.num_attention_heads, config.head_dim
        slots = config.persistent_memory_size
        self.projection = FusedProjection(config, submodules, [Part("key_extractor.linear_key", hs)], init_method,
                                          config.add_bias_linear, tp_group=self.tp_group)
        self.key_extractor = LeakyKeyExtractor(config, scale_pow=2, tp_group=self.tp_group)
        self.memory_keys = self.per_head_parameter(torch.randn(heads, slots, hs) / hs**0.5)
        self.memory_values = self.per_head_parameter(torch.randn(heads, slots, hs) / hs**0.5)
        self.output_scale = self.per_head_parameter(torch.full((heads,), -0.05))
        self.linear_proj = row_linear(submodules, config, d, d, output_init_method, config.add_bias_linear, self.tp_group)

    def forward(self, x: Tensor, context: MemoryContext) -> Tensor:
        x = gather_sequence(x, self.config, self.tp_group)

        def core(key: Tensor) -> Tensor:  # recomputed under selective recompute
            keys = self.key_extractor.features(key, context, x.dtype)  # (b, H_local, s, hs)
            b = keys.shape[0]
            slot_keys = self.memory_keys.to(keys.dtype).unsqueeze(0).expand(b, -1, -1, -1)
            slot_values = self.memory_values.to(keys.dtype).unsqueeze(0).expand(b, -1, -1, -1)
            y = F.scaled_dot_product_attention(keys, slot_keys, slot_values, scale=1.0)
            return y * exp10_scale(self.output_scale).to(y.dtype)

        y = maybe_checkpoint(recompute_memory_core(self.config), core, *self.projection(x))
        return self.linear_proj(merge_heads(y))[0]


class AssociativeMemory(MosaicModule):
    """One v2 memory's own parameters (short- or long-term): gated keys, peeking values, adaptive
    bandwidth β_t = β₁·n_t^α + β₀ on the query copy. Its projections live in the owning
    LongShortMemory's fused GEMM, under this memory's names."""

    @staticmethod
    def parts(config: MosaicConfig) -> list[Part]:
        """W_φ, W_g, W_λ, W_v under their names in this memory, in the order they are drawn."""
        hs = config.head_dim
        return [Part("key_extractor.linear_key", hs), Part("key_extractor.linear_gate", 1),
                Part("key_extractor.linear_decay", 1), Part("value_extractor.linear_value", hs)]

    def __init__(self, config: MosaicConfig, kind: str, tp_group=None):
        super().__init__(config, tp_group)
        if kind not in ("short", "long"):
            raise ValueError(f"AssociativeMemory kind must be 'short' or 'long', got {kind!r}")
        heads = config.num_attention_heads
        self.kind = kind
        self.key_extractor = GatedKeyExtractor(config, tp_group=self.tp_group)
        self.value_extractor = ValueExtractor(config, tp_group=self.tp_group)
        self.bandwidth_theta0 = self.per_head_parameter(torch.full((heads,), config.bandwidth_theta_init))
        self.bandwidth_theta1 = self.per_head_parameter(torch.full((heads,), config.bandwidth_theta_init))
        self.bandwidth_theta_alpha = self.per_head_parameter(torch.full((heads,), config.bandwidth_alpha_init))

    def visibility(self, context: MemoryContext) -> Visibility:
        if self.kind == "short":
            return Visibility(delay=1, window=self.config.short_term_window)
        return Visibility(delay=int(context.long_term_delay))


class LongShortMemory(MosaicModule):
    """v2 short- and long-term memories with one output projection W_o (2d -> d).

    Both memories' projections are one GEMM whose output is laid out per kind,
    [key_short ; key_long ; gate_short ; gate_long ; decay_… ; value_…], so the pieces the shared
    key scan and value peek take are views (no concatenation), each memory's parts keep their
    checkpoint names, and they are drawn in the order the memories' own linears were.
    The projection input of W_o is ordered per head, [short_h ; long_h] for h = 0..H-1, so the
    contiguous RowParallelLinear split of its input gives each TP rank exactly its heads.
    """

    def __init__(self, config: MosaicConfig, submodules: MemoryLinears, init_method: Callable,
                 output_init_method: Optional[Callable] = None, tp_group=None):
        super().__init__(config, tp_group)
        d = config.hidden_size
        parts = [Part(f"{kind}.{p.name}", p.per_head) for p in AssociativeMemory.parts(config)
                 for kind in ("short_term", "long_term")]
        self.projection = FusedProjection(config, submodules, parts, init_method, False, tp_group=self.tp_group,
                                          draw=False)
        self.projection.draw([0, 2, 4, 6], init_method)  # each memory's linears, then its own scalars
        self.short_term = AssociativeMemory(config, "short", tp_group=self.tp_group)
        self.projection.draw([1, 3, 5, 7], init_method)
        self.long_term = AssociativeMemory(config, "long", tp_group=self.tp_group)
        self.linear_proj = row_linear(submodules, config, 2 * d, d, output_init_method or init_method, False, self.tp_group)

    def forward(self, x: Tensor, context: MemoryContext) -> Tensor:
        x = gather_sequence(x, self.config, self.tp_group)  # one gather for both memories
        short, long = self.short_term, self.long_term
        visibilities = (short.visibility(context), long.visibility(context))

        def core(key: Tensor, gate: Tensor, decay: Tensor, value: Tensor) -> Tensor:  # recomputed under selective recompute
            # The two memories' heads side by side through one key scan, one value peek and one
            # norm of each kind (every head's math is independent): eager, each op is a dispatch
            # and a pass over memory, and the memories' features are most of v2's ops.
            H = short.key_extractor.num_local_heads
            layout = context.layout
            counts = layout.derived(("stacked_counts", visibilities), lambda: torch.stack(
                [visibility.visible_counts(layout) for visibility in visibilities], dim=1))
            beta = adaptive_bandwidth(
                torch.cat([short.bandwidth_theta0, long.bandwidth_theta0]).float(),
                torch.cat([short.bandwidth_theta1, long.bandwidth_theta1]).float(),
                torch.cat([short.bandwidth_theta_alpha, long.bandwidth_theta_alpha]).float(), counts,
            )
            keys, queries = short.key_extractor.features(key, gate, decay, context, x.dtype, heads=2 * H,
                                                         bandwidth=beta)
            values = short.value_extractor.features(value, context, x.dtype, others=(long.value_extractor,))
            # split, not slices: its backward is one cat, a slice's zero-fills the whole tensor
            ys = [recall(q, k, v, visibility, context) for q, k, v, visibility in
                  zip(queries.split(H, dim=1), keys.split(H, dim=1), values.split(H, dim=1), visibilities)]
            # [s, b, H_local·2hs] ordered [short_h ; long_h] per head: one copy straight to the
            # projection's layout (merge_heads of a stack would copy twice).
            s, b = ys[0].shape[2], ys[0].shape[0]
            return torch.stack([y.permute(2, 0, 1, 3) for y in ys], dim=3).reshape(s, b, -1)

        both = maybe_checkpoint(recompute_memory_core(self.config), core, *self.projection(x, together=2))
        return self.linear_proj(both)[0]
