"""Memory Mosaics v1/v2 as a Hugging Face ``PreTrainedModel`` in plain torch, with cached decoding.

This file holds the PreTrainedModel classes, the layout of each forward's tokens and the
decoding cache's plumbing; the layers are in layers_memory_mosaic.py, the memories in
memories_memory_mosaic.py. Parameter names mirror megatron_mosaic.model's state dict (TP=1)
under ``model.``, plus ``lm_head`` (tied to the embedding for v1), so converting is a
near-identity mapping.

Decoding (spec section 6): with ``use_cache`` the model keeps a MosaicCache that every memory
reads and extends (memories_memory_mosaic.py says how). The prompt is one such step on an empty
cache: the full forward, then the cache is kept.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_memory_mosaic import MosaicCache
from .configuration_memory_mosaic import MemoryMosaicConfig
from .layers_memory_mosaic import Decoder, Embedding, LayerNorm, RMSNorm
from .memories_memory_mosaic import (
    AdaptivePairMemory,
    LeakyKeyExtractor,
    PersistentMemory,
    StepContext,
    ValueExtractor,
)

try:  # exported model directory: the memory math was copied next to this file
    from .layout import SequenceLayout
except ModuleNotFoundError as error:  # inside the package: megatron_mosaic/hf/ has no layout.py
    if error.name != f"{__package__}.layout":
        raise
    from megatron_mosaic.memory import SequenceLayout
else:
    # Unused here, imported for the loader: transformers 5.0 copies only the modeling file's
    # direct relative imports into its module cache, and memories_memory_mosaic.py, scan.py and
    # retrieval.py import these (export_files.memory_code_files refuses an export that would miss one).
    from .bandwidth import adaptive_bandwidth  # noqa: F401
    from .features import leaky_keys  # noqa: F401
    from .flex import flex_recall  # noqa: F401
    from .masks import shape_constant  # noqa: F401
    from .precision import fp32_region  # noqa: F401
    from .retrieval import associative_recall  # noqa: F401
    from .runs import shifted_recall  # noqa: F401
    from .scan import linear_recurrence  # noqa: F401
    from .values import peek_values  # noqa: F401


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
