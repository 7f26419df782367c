"""The memory blocks of the Hugging Face Memory Mosaic model, in plain torch.

Key and value extractors, the pair memories (v1 contextual, v2 short- and long-term) with their
cached recall, and v1's persistent memory; StepContext is what a forward tells each of them.
Parameter names mirror megatron_mosaic.model's memories (TP=1).

The memory math (recurrence scan, value peek, visibility, recall, adaptive bandwidth) is not
duplicated here: it is megatron_mosaic/memory/, which imports only torch. An exported model
directory carries copies of those files next to this one and this file imports them
relatively; inside the package they are imported from megatron_mosaic.memory.

Decoding (spec section 6): with a cache, a forward over new tokens runs each memory's key
recurrence from its carried state, files the previous step's pending pair once its value can
peek at the first new token, and lets the new queries read the filed pairs (visibility decided
by global positions and document starts, exactly as in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache_memory_mosaic import MemoryCache, MosaicCache
from .configuration_memory_mosaic import MemoryMosaicConfig

try:  # exported model directory: the memory math was copied next to this file
    from .scan import RecurrenceState, linear_recurrence
except ModuleNotFoundError as error:  # inside the package: megatron_mosaic/hf/ has no scan.py
    if error.name != f"{__package__}.scan":
        raise
    from megatron_mosaic.memory import (
        RecurrenceState,
        SequenceLayout,
        Visibility,
        adaptive_bandwidth,
        associative_recall,
        linear_recurrence,
        peek_values,
    )
    from megatron_mosaic.memory.features import (
        exp10_scale,
        finish_values,
        gated_unit_keys,
        leaky_keys,
    )
else:
    from .bandwidth import adaptive_bandwidth
    from .features import exp10_scale, finish_values, gated_unit_keys, leaky_keys
    from .layout import SequenceLayout
    from .retrieval import Visibility, associative_recall
    from .values import peek_values


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H·D) -> (B, H, T, D); channel h·D + j belongs to head h (Megatron's TP split)."""
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H·D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


@dataclass
class StepContext:
    """What every layer needs to know about the tokens of this forward.

    layout:  global positions / document starts of the new tokens (B, T).
    plain:   one document, no padding, empty cache: recall may take the layout-free fast path.
    cache:   the decoding cache to read and update, or None (no caching).
    layer:   index of the layer being run (set by the decoder loop).
    """

    layout: SequenceLayout
    plain: bool
    cache: MosaicCache | None
    layer: int = 0

    @property
    def resets(self) -> Tensor | None:
        return None if self.plain else self.layout.resets

    def memory_cache(self, name: str, window: int | None = None) -> MemoryCache | None:
        return None if self.cache is None else self.cache.memory(self.layer, name, window)


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------


class LeakyKeyExtractor(nn.Module):
    """v1 key: k_t = Norm(Σ_s e^{-λ(t-s)} W_k x_s) · exp(min(pow·10κ, key_scale_max)), λ = |10θ|."""

    def __init__(self, config: MemoryMosaicConfig, scale_power: int):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.scale_power = H, scale_power
        self.key_scale_max, self.eps = config.key_scale_max, config.memory_norm_epsilon
        self.linear_key = nn.Linear(d, d, bias=config.add_bias_linear)
        self.leak = nn.Parameter(torch.linspace(0.5, 5.0, H) / 10)
        self.key_scale = nn.Parameter(torch.full((H,), 0.1))

    def forward(self, x: Tensor, resets: Tensor | None, state: RecurrenceState | None):
        """x (B, T, d) -> keys (B, H, T, hs) in x's dtype, final recurrence state (fp32)."""
        raw = _split_heads(self.linear_key(x), self.num_heads).float()
        log_decay = -(10.0 * self.leak.float()).abs().view(1, -1, 1, 1)
        # Eager scan: generation calls it with a new length every step (torch.compile would recompile).
        scaled, log_scale, final = linear_recurrence(raw, log_decay, None, resets, state, compiled=False)
        keys = leaky_keys(scaled, log_scale, self.key_scale, self.scale_power, self.key_scale_max, self.eps)
        return keys.to(x.dtype), final


class GatedKeyExtractor(nn.Module):
    """v2 key: k̄_t = exp(W_g x_t)·W_φ x_t + exp(-|W_λ x_t|)·k̄_{t-1}; k_t = Norm(k̄_t)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.linear_key = nn.Linear(d, d, bias=False)
        self.linear_gate = nn.Linear(d, H, bias=False)
        self.linear_decay = nn.Linear(d, H, bias=False)

    def forward(self, x: Tensor, resets: Tensor | None, state: RecurrenceState | None):
        """x (B, T, d) -> unit keys (B, H, T, hs) in x's dtype, final recurrence state (fp32)."""
        raw = _split_heads(self.linear_key(x), self.num_heads).float()
        log_gain = self.linear_gate(x).float().transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        log_decay = -self.linear_decay(x).float().abs().transpose(1, 2).unsqueeze(-1)
        scaled, _, final = linear_recurrence(raw, log_decay, log_gain, resets, state, compiled=False)  # eager: see v1
        return gated_unit_keys(scaled).to(x.dtype), final


class ValueExtractor(nn.Module):
    """v_t = scale_h · Norm(c_h ṽ_t + (1-c_h) ṽ_{t+1}), ṽ = W_v x.

    v1: scale = exp(10ν); v2: scale = exp(clamp(θ, -15, 15)).
    """

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.version, self.eps = H, config.mosaic_version, config.memory_norm_epsilon
        self.linear_value = nn.Linear(d, d, bias=config.add_bias_linear and self.version == 1)
        self.mix = nn.Parameter(torch.rand(H))
        self.value_scale = nn.Parameter(torch.full((H,), -0.05 if self.version == 1 else 0.0))

    def project(self, x: Tensor) -> Tensor:
        """ṽ: (B, T, d) -> (B, H, T, hs) fp32."""
        return _split_heads(self.linear_value(x), self.num_heads).float()

    def finish(self, raw: Tensor, resets: Tensor | None, dtype: torch.dtype, next_value: Tensor | None = None,
               next_resets: Tensor | None = None) -> Tensor:
        """Final values (B, H, T, hs) in ``dtype`` from raw fp32 ṽ; the token after the last is
        ``next_value`` (then ``next_resets`` says whether it starts a document) or none."""
        mixed = peek_values(raw, self.mix.float().view(1, -1, 1, 1), resets, next_value, next_resets)
        return finish_values(mixed, self.value_scale, self.version, self.eps).to(dtype)


# ---------------------------------------------------------------------------------------------
# Memories
# ---------------------------------------------------------------------------------------------


class PairMemory(nn.Module):
    """An associative memory over (key, value) pairs of the context, keys used as queries.

    Subclasses set ``key_extractor``, ``value_extractor`` and may rescale queries (v2 β_t).
    """

    key_extractor: nn.Module
    value_extractor: ValueExtractor

    def scale_queries(self, keys: Tensor, layout: SequenceLayout, visibility: Visibility) -> Tensor:
        return keys

    def recall(self, x: Tensor, ctx: StepContext, visibility: Visibility, name: str) -> Tensor:
        """x (B, T, d) -> per-head recall (B, H, T, hs) over every visible pair, cached or new."""
        cache = ctx.memory_cache(name, visibility.window)
        state = cache.key_state if cache is not None and cache.has_pending else None
        keys, key_state = self.key_extractor(x, ctx.resets, state)
        raw = self.value_extractor.project(x)
        values = self.value_extractor.finish(raw, ctx.resets, x.dtype)
        queries = self.scale_queries(keys, ctx.layout, visibility)
        positions, doc_starts = ctx.layout.positions, ctx.layout.doc_starts
        if cache is None or not cache.has_pending:
            if ctx.plain:
                out = associative_recall(queries, keys, values, visibility)
            else:
                out = associative_recall(queries, keys, values, visibility, ctx.layout, ctx.layout)
        else:
            # The pending pair's value can now peek at the first new token (unless a document
            # starts there), which files it; then the new queries read filed + new pairs.
            layout = ctx.layout
            pending = self.value_extractor.finish(
                cache.pending_value, None, x.dtype, next_value=raw[:, :, :1], next_resets=layout.resets[:, 0]
            )
            keys = torch.cat([cache.keys, cache.pending_key, keys], dim=2)
            values = torch.cat([cache.values, pending, values], dim=2)
            positions = torch.cat([cache.positions, cache.pending_position, positions], dim=1)
            doc_starts = torch.cat([cache.doc_starts, cache.pending_doc_start, doc_starts], dim=1)
            key_layout = SequenceLayout(positions, doc_starts, max(layout.total_length, positions.shape[1]))
            out = associative_recall(queries, keys, values, visibility, layout, key_layout)
        if cache is not None:
            cache.update(keys, values, positions, doc_starts, raw[:, :, -1:], key_state)
        return out


class ContextualMemory(PairMemory):
    """v1 contextual memory: query t reads pairs i <= t-1 of its document; output projection."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d = config.hidden_size
        self.key_extractor = LeakyKeyExtractor(config, scale_power=1)
        self.value_extractor = ValueExtractor(config)
        self.linear_proj = nn.Linear(d, d, bias=config.add_bias_linear)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        y = self.recall(x, ctx, Visibility(delay=1), "contextual")
        return self.linear_proj(_merge_heads(y))


class PersistentMemory(nn.Module):
    """v1 persistent memory: y = softmax(k · M_kᵀ) M_v · exp(10ν'), keys scaled twice (pow 2)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, H, hs, P = config.hidden_size, config.num_attention_heads, config.head_dim, config.persistent_memory_size
        self.key_extractor = LeakyKeyExtractor(config, scale_power=2)
        self.memory_keys = nn.Parameter(torch.randn(H, P, hs) / hs**0.5)
        self.memory_values = nn.Parameter(torch.randn(H, P, hs) / hs**0.5)
        self.output_scale = nn.Parameter(torch.full((H,), -0.05))
        self.linear_proj = nn.Linear(d, d, bias=config.add_bias_linear)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        cache = ctx.memory_cache("persistent")
        state = cache.key_state if cache is not None else None
        keys, final = self.key_extractor(x, ctx.resets, state)
        if cache is not None:
            cache.key_state = final
        B = keys.shape[0]
        mk = self.memory_keys.to(keys.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        mv = self.memory_values.to(keys.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        y = F.scaled_dot_product_attention(keys, mk, mv, scale=1.0)
        y = y * exp10_scale(self.output_scale).to(y.dtype)
        return self.linear_proj(_merge_heads(y))


class AdaptivePairMemory(PairMemory):
    """v2 short- or long-term memory: gated keys, query scaled by β_t = β₁·n_t^α + β₀."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        H = config.num_attention_heads
        self.key_extractor = GatedKeyExtractor(config)
        self.value_extractor = ValueExtractor(config)
        self.bandwidth_theta0 = nn.Parameter(torch.full((H,), 1.5))
        self.bandwidth_theta1 = nn.Parameter(torch.full((H,), 1.5))
        self.bandwidth_theta_alpha = nn.Parameter(torch.full((H,), 1 / 3))

    def scale_queries(self, keys: Tensor, layout: SequenceLayout, visibility: Visibility) -> Tensor:
        counts = visibility.visible_counts(layout)  # global positions: right for cached steps too
        beta = adaptive_bandwidth(
            self.bandwidth_theta0.float(), self.bandwidth_theta1.float(), self.bandwidth_theta_alpha.float(), counts
        )
        return (keys.float() * beta).to(keys.dtype)


class ShortLongTermMemory(nn.Module):
    """v2 memory block: short-term (window h) and long-term (delay m) recalls, one projection.

    linear_proj input is per head [short_h ; long_h], matching Megatron's TP split of W_o.
    """

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d = config.hidden_size
        self.window, self.delay = config.short_term_window, config.long_term_inference_delay
        self.short_term = AdaptivePairMemory(config)
        self.long_term = AdaptivePairMemory(config)
        self.linear_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        short = self.short_term.recall(x, ctx, Visibility(delay=1, window=self.window), "short_term")
        long = self.long_term.recall(x, ctx, Visibility(delay=self.delay), "long_term")
        return self.linear_proj(_merge_heads(torch.cat([short, long], dim=-1)))
