"""Hugging Face configuration for Memory Mosaics v1 and v2 (``model_type: memory_mosaic``).

This file is copied verbatim into every exported model directory, so it imports only
transformers. Field meanings follow megatron_mosaic.model.config.MosaicConfig (spec sections 2-3).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MemoryMosaicConfig(PretrainedConfig):
    """Architecture of a Memory Mosaic language model.

    mosaic_version:           1 (contextual + persistent memory) or 2 (short/long-term memory + SwiGLU).
    hidden_size, num_attention_heads, num_hidden_layers, vocab_size: the usual.
    ffn_hidden_size:          v2 SwiGLU width d' (default 4·d).
    persistent_memory_size:   v1 P slots per head (0: round(3.5·d)).
    short_term_window:        v2 h: the short-term memory sees pairs i in [t-h+1, t-1].
    long_term_inference_delay: v2 m at inference: the long-term memory sees pairs i <= t-m.
    document_masking, eod_token_id: memories and key recurrences restart after each EOD token.
    key_scale_max:            v1 clamp on pow·10·κ before exponentiation.
    add_bias_linear:          v1 linears and LayerNorms carry biases.
    layernorm_epsilon:        eps of LayerNorm (v1) / RMSNorm (v2).
    memory_norm_epsilon:      eps of the key/value normalisation z / (‖z‖ + eps).
    """

    model_type = "memory_mosaic"
    # Trainer drops these output fields from predictions; the cache field's name depends on the
    # transformers 5.x release (``past_key_values`` before the rename, ``cache`` after).
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mosaic_version: int = 2,
        ffn_hidden_size: int | None = None,
        persistent_memory_size: int = 0,
        short_term_window: int = 256,
        long_term_inference_delay: int = 64,
        document_masking: bool = True,
        eod_token_id: int | None = None,
        key_scale_max: float = 5.0,
        add_bias_linear: bool = False,
        layernorm_epsilon: float = 1e-5,
        memory_norm_epsilon: float = 1e-10,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if mosaic_version not in (1, 2):
            raise ValueError(f"MemoryMosaicConfig: mosaic_version must be 1 or 2, got {mosaic_version!r}")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"MemoryMosaicConfig: hidden_size {hidden_size} is not divisible by num_attention_heads "
                f"{num_attention_heads}"
            )
        if short_term_window < 2 or long_term_inference_delay < 1:
            raise ValueError(
                "MemoryMosaicConfig: need short_term_window >= 2 and long_term_inference_delay >= 1, got "
                f"{short_term_window} and {long_term_inference_delay}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mosaic_version = mosaic_version
        self.ffn_hidden_size = ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size
        self.persistent_memory_size = persistent_memory_size or round(3.5 * hidden_size)
        self.short_term_window = short_term_window
        self.long_term_inference_delay = long_term_inference_delay
        self.document_masking = document_masking
        self.eod_token_id = eod_token_id
        self.key_scale_max = key_scale_max
        self.add_bias_linear = add_bias_linear
        self.layernorm_epsilon = layernorm_epsilon
        self.memory_norm_epsilon = memory_norm_epsilon
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # v1 ties the output head to the embedding (official code); v2 does not (spec section 3).
        if tie_word_embeddings is None:
            tie_word_embeddings = mosaic_version == 1
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
