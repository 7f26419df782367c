"""Memory Mosaics v1/v2 as a Hugging Face ``PreTrainedModel`` in plain torch, with cached decoding.

Parameter names mirror megatron_mosaic.model's state dict (TP=1) under ``model.``, plus
``lm_head`` (tied to the embedding for v1), so converting is a near-identity mapping.

The memory math (recurrence scan, value peek, visibility, recall, adaptive bandwidth) is not
duplicated here: it is megatron_mosaic/memory/, which imports only torch. An exported model
directory carries copies of those files next to this one and this file imports them
relatively; inside the package they are imported from megatron_mosaic.memory.

Decoding (spec section 6): with ``use_cache`` the model keeps a MosaicCache. A forward over new
tokens runs each memory's key recurrence from its carried state, files the previous step's
pending pair once its value can peek at the first new token, and lets the new queries read the
filed pairs (visibility decided by global positions and document starts, exactly as in training).
The prompt is one such step on an empty cache: the full forward, then the cache is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_memory_mosaic import MemoryCache, MosaicCache
from .configuration_memory_mosaic import MemoryMosaicConfig

try:  # exported model directory: the memory math was copied next to this file
    from .scan import RecurrenceState, linear_recurrence
except ModuleNotFoundError as error:  # inside the package: megatron_mosaic/hf/ has no scan.py
    if error.name != f"{__package__}.scan":
        raise
    from megatron_mosaic.memory import (  # noqa: F401
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
    # Unused here, imported for the loader: transformers 5.0 copies only the modeling file's
    # direct relative imports into its module cache, and scan.py and retrieval.py import these
    # (export.memory_code_files refuses an export that would miss one).
    from .flex import flex_recall  # noqa: F401
    from .masks import shape_constant  # noqa: F401
    from .precision import fp32_region  # noqa: F401
    from .retrieval import Visibility, associative_recall
    from .runs import shifted_recall  # noqa: F401
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


class SwiGLU(nn.Module):
    """Persistent memory of v2: W₂(SiLU(W₁x) ⊙ W₃x) with linear_fc1 = [W₁; W₃] (Megatron layout)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = nn.Linear(d, 2 * f, bias=False)
        self.linear_fc2 = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# Blocks and model
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (v1)."""

    def __init__(self, dim: int, bias: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm as torch.nn.RMSNorm (v2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MosaicV1Layer(nn.Module):
    """x += CM(LN₁ x); x += PM(LN₂ x)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, bias, eps = config.hidden_size, config.add_bias_linear, config.layernorm_epsilon
        self.input_layernorm = LayerNorm(d, bias, eps)
        self.contextual_memory = ContextualMemory(config)
        self.pre_persistent_layernorm = LayerNorm(d, bias, eps)
        self.persistent_memory = PersistentMemory(config)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        x = x + self.contextual_memory(self.input_layernorm(x), ctx)
        return x + self.persistent_memory(self.pre_persistent_layernorm(x), ctx)


class MosaicV2Layer(nn.Module):
    """x += W_o[STM(N x); LTM(N x)]; x += SwiGLU(N x)."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = RMSNorm(d, eps)
        self.memory = ShortLongTermMemory(config)
        self.pre_mlp_layernorm = RMSNorm(d, eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        x = x + self.memory(self.input_layernorm(x), ctx)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Embedding(nn.Module):
    """Token embedding only (no position embedding): ``embedding.word_embeddings``."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


class Decoder(nn.Module):
    """``decoder.layers.{i}`` and ``decoder.final_layernorm``."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        layer_cls = MosaicV1Layer if config.mosaic_version == 1 else MosaicV2Layer
        self.layers = nn.ModuleList([layer_cls(config) for _ in range(config.num_hidden_layers)])
        if config.mosaic_version == 1:
            self.final_layernorm = LayerNorm(config.hidden_size, config.add_bias_linear, config.layernorm_epsilon)
        else:
            self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, x: Tensor, ctx: StepContext, all_hidden: list[Tensor] | None = None) -> Tensor:
        for index, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(x)
            ctx.layer = index
            x = layer(x, ctx)
        x = self.final_layernorm(x)
        if all_hidden is not None:
            all_hidden.append(x)
        return x


def build_step_layout(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: MosaicCache | None,
    eod_token_id: int | None,
) -> tuple[SequenceLayout, bool, Tensor]:
    """Global layout of the new tokens, continuing the cache's clock and current documents.

    A token starts a document at position 0, after an EOD token (when ``eod_token_id`` is set),
    or where left padding ends (the pads form their own document, so real tokens never see
    them: a left-padded row computes exactly what it would unpadded).
    Returns (layout, plain, ended) with plain = single document, no padding, empty cache, and
    ended (B,) bool = the last new token is an EOD (the next token starts a document).
    """
    B, T = input_ids.shape
    device = input_ids.device
    offset = 0 if cache is None else cache.get_seq_length()
    positions = (torch.arange(T, device=device, dtype=torch.int64) + offset).expand(B, T)
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    if offset == 0:
        starts[:, 0] = True
    else:
        starts[:, 0] = cache.last_ended_document
    if eod_token_id is not None:
        starts[:, 1:] |= input_ids[:, :-1] == eod_token_id
        ended = input_ids[:, -1] == eod_token_id
    else:
        ended = torch.zeros(B, dtype=torch.bool, device=device)
    padded = False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = ({B}, {offset + T}), "
                f"got {tuple(attention_mask.shape)}"
            )
        new_mask = attention_mask[:, -T:].to(torch.bool)
        if offset > 0:
            if not bool(new_mask.all()):
                raise ValueError("attention_mask: padding after the first forward is not supported "
                                 "(only left padding of the prompt)")
        else:
            if bool((new_mask[:, :-1] & ~new_mask[:, 1:]).any()) or not bool(new_mask[:, -1].all()):
                raise ValueError("attention_mask: only left padding is supported (each row 0...0 1...1, "
                                 "at least one 1)")
            first_real = T - new_mask.sum(dim=1)  # (B,)
            starts |= positions == (first_real + offset)[:, None]
            padded = bool((first_real > 0).any())
    previous = torch.zeros(B, 1, dtype=torch.int64, device=device) if offset == 0 else cache.last_doc_start[:, None]
    doc_starts = torch.where(starts, positions, previous.expand(B, T)).cummax(dim=1).values
    layout = SequenceLayout(positions.contiguous(), doc_starts, offset + T)
    plain = offset == 0 and not padded and not bool(starts[:, 1:].any())
    return layout, plain, ended


# ---------------------------------------------------------------------------------------------
# The cache's name across transformers 5.x
# ---------------------------------------------------------------------------------------------
# transformers renamed the decoding cache from ``past_key_values`` to ``cache`` within 5.x (5.24
# passes ``cache=`` to forward and declares ``cache`` on its output classes; the old name still
# works there but logs a deprecation warning on every use). This file ships inside exported model
# directories that must run under whichever 5.x is installed, so the name is read off the
# installed output class once instead of being hard-coded.


def _cache_field(output_cls: type) -> str:
    """The name the installed transformers gives the cache field of ``output_cls``."""
    names = {f.name for f in fields(output_cls)}
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise ImportError(f"transformers' {output_cls.__name__} declares no cache field (neither 'cache' nor "
                      f"'past_key_values'): this transformers release is not supported")


CACHE_FIELD = _cache_field(CausalLMOutputWithPast)
if _cache_field(BaseModelOutputWithPast) != CACHE_FIELD:
    raise ImportError("transformers' output classes disagree on the cache field's name")


def output_cache(output) -> MosaicCache | None:
    """The cache held by a model output, read under the installed transformers' field name."""
    return getattr(output, CACHE_FIELD)


def _chosen_cache(cache: MosaicCache | None, past_key_values: MosaicCache | None) -> MosaicCache | None:
    """The cache given under either name (``cache``: transformers >= 5.24 and new code;
    ``past_key_values``: older 5.x generate() and existing callers); both at once is ambiguous."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the decoding cache as either cache= or past_key_values=, not both")
    chosen = cache if cache is not None else past_key_values
    if chosen is not None and not isinstance(chosen, MosaicCache):
        raise TypeError(f"the decoding cache must be a MosaicCache (from this model), got {type(chosen).__name__}")
    return chosen


def _reject_unsupported(kwargs: dict, owner: str) -> None:
    """generate() passes switches such as output_attentions=False: accept them only when off."""
    unsupported = sorted(name for name, value in kwargs.items() if value is not None and value is not False)
    if unsupported:
        raise TypeError(f"{owner}.forward got unsupported arguments: {unsupported}")


class MemoryMosaicPreTrainedModel(PreTrainedModel):
    config_class = MemoryMosaicConfig
    base_model_prefix = "model"
    _no_split_modules = ["MosaicV1Layer", "MosaicV2Layer"]
    _skip_keys_device_placement = [CACHE_FIELD]  # device_map dispatch must not move the cache
    _is_stateful = True  # the cache cannot be rewound: no assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for modules whose weights were not loaded (spec inits for the scalars).

        Through transformers.initialization, which skips tensors from_pretrained already
        loaded: transformers 5.0 calls this on modules whose weights came from the checkpoint,
        and a plain in-place init would overwrite them."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LeakyKeyExtractor):
            H = module.leak.shape[0]
            init.copy_(module.leak, torch.linspace(0.5, 5.0, H, device=module.leak.device) / 10)
            init.constant_(module.key_scale, 0.1)
        elif isinstance(module, ValueExtractor):
            init.uniform_(module.mix, 0.0, 1.0)
            init.constant_(module.value_scale, -0.05 if module.version == 1 else 0.0)
        elif isinstance(module, PersistentMemory):
            hs = module.memory_keys.shape[-1]
            init.normal_(module.memory_keys, 0.0, hs**-0.5)
            init.normal_(module.memory_values, 0.0, hs**-0.5)
            init.constant_(module.output_scale, -0.05)
        elif isinstance(module, AdaptivePairMemory):
            init.constant_(module.bandwidth_theta0, 1.5)
            init.constant_(module.bandwidth_theta1, 1.5)
            init.constant_(module.bandwidth_theta_alpha, 1 / 3)


class MemoryMosaicModel(MemoryMosaicPreTrainedModel):
    """Embedding + decoder: final normalised hidden states (B, T, d) and the cache if any."""

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: MosaicCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        past_key_values: MosaicCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The cache may come as ``cache`` or ``past_key_values`` (transformers' old name)."""
        _reject_unsupported(kwargs, "MemoryMosaicModel")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        cache = _chosen_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = MosaicCache(self.config.num_hidden_layers)
        if cache is not None and cache.batch_size not in (-1, input_ids.shape[0]):
            raise ValueError(f"the cache holds {cache.batch_size} sequences, input_ids has {input_ids.shape[0]}")
        eod = self.config.eod_token_id if self.config.document_masking else None
        layout, plain, ended = build_step_layout(input_ids, attention_mask, cache, eod)
        ctx = StepContext(layout=layout, plain=plain, cache=cache)
        hidden = [] if output_hidden_states else None
        x = self.decoder(self.embedding(input_ids), ctx, hidden)
        if cache is not None:
            cache.advance(input_ids.shape[1], layout.doc_starts[:, -1], ended)
        return BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None, **{CACHE_FIELD: cache}
        )


class MemoryMosaicForCausalLM(MemoryMosaicPreTrainedModel, GenerationMixin):
    """Memory Mosaic language model: logits (B, T, V); ``generate()`` decodes with a MosaicCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embedding.word_embeddings.weight"}

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__(config)
        self.model = MemoryMosaicModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: forward creates a MosaicCache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: MosaicCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: MosaicCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) -> logits (B, T, V) fp32-or-model-dtype; loss if labels (shifted inside).

        With ``use_cache`` (or a cache, given as ``cache`` or under transformers' old name
        ``past_key_values``) the tokens continue the cached prefix. The output holds the cache
        under the installed transformers' field name (CACHE_FIELD; read it with output_cache).
        """
        # Early 5.x generate() also passes cache_position, unused (the cache keeps its own clock).
        # Not a declared parameter: 5.24 warns about remote-code models whose forward declares it.
        kwargs.pop("cache_position", None)
        _reject_unsupported(kwargs, "MemoryMosaicForCausalLM")
        cache = _chosen_cache(cache, past_key_values)
        use_cache = bool(use_cache) or cache is not None
        base = self.model(input_ids, attention_mask, cache, use_cache, bool(output_hidden_states))
        hidden, cache = base.last_hidden_state, output_cache(base)
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        if return_dict is False:
            output = (logits, cache) if use_cache else (logits,)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=base.hidden_states, **{CACHE_FIELD: cache})


__all__ = ["MemoryMosaicForCausalLM", "MemoryMosaicModel", "MemoryMosaicPreTrainedModel"]
