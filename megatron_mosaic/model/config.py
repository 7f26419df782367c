"""MosaicConfig: a Megatron TransformerConfig with the Memory Mosaics v1/v2 fields.

Version-dependent defaults (resolved in ``__post_init__`` before Megatron's own checks):

=====================  =========================  ==============================
field                  v1 (official nanoMosaics)  v2 (paper, spec section 3)
=====================  =========================  ==============================
add_bias_linear        True                       False (v2 linears have no bias)
normalization          'LayerNorm'                'RMSNorm'
gated_linear_unit      unused                     True, activation SiLU (SwiGLU)
ffn_hidden_size        unused                     3 * hidden_size (paper small)
init                   N(0, 0.02), out 0.02/√2L   truncated normal, σ per layer
=====================  =========================  ==============================
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """In-place N(0, std²) truncated at ±3σ (spec section 3)."""
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3.0 * std, b=3.0 * std)


def truncated_normal_init(std: float):
    """A picklable Megatron-style init method (callable on a tensor)."""
    return functools.partial(truncated_normal_, std=std)


@dataclasses.dataclass
class MosaicConfig(TransformerConfig):
    """Megatron TransformerConfig plus the Memory Mosaics fields (see the README section).

    The per-head layout follows Megatron: ``num_attention_heads`` heads of size
    ``hidden_size // num_attention_heads``, split across tensor-parallel ranks.
    """

    mosaic_version: int = 1
    """1: contextual + persistent memory (Memory Mosaics); 2: short/long-term + SwiGLU (at scale)."""

    persistent_memory_size: int = 0
    """v1 persistent-memory slots P per head; 0 means round(3.5 * hidden_size) (GPT-2 parity)."""

    short_term_window: int = 256
    """v2 short-term memory window h: query t reads pairs t-h+1 .. t-1."""

    long_term_delay_range: tuple[int, int] = (64, 256)
    """v2 training delay m is drawn uniformly from this closed range once per step."""

    long_term_inference_delay: int = 64
    """v2 delay m used in eval mode when the caller passes none."""

    bandwidth_theta_init: float = 1.5
    """v2 adaptive bandwidth: initial θ₀ = θ₁ (β₀ = e^θ₀, β₁ = e^θ₁)."""

    bandwidth_alpha_init: float = 1.0 / 3.0
    """v2 adaptive bandwidth: initial θ_α (α = min(|θ_α|, 1))."""

    document_masking: bool = True
    """Memories and key recurrences never cross EOD boundaries (needs the model's eod_token_id)."""

    v1_key_scale_max: float = 5.0
    """v1 key scale exp(min(pow * 10κ, v1_key_scale_max)), as the official nanoMosaics code."""

    init_seed: Optional[int] = None
    """Seed of the initial weights: each layer, the embedding, output layer and final norm draw
    from their own stream of it, so every parallel layout starts from the same weights (see
    ``model.init_rng``). None: draw from the ambient generators in construction order."""

    # Megatron fields whose default differs for Memory Mosaics (None = resolved per version).
    add_bias_linear: Optional[bool] = None
    normalization: Optional[str] = None
    gated_linear_unit: Optional[bool] = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.mosaic_version not in (1, 2):
            raise ValueError(f"MosaicConfig.mosaic_version must be 1 or 2, got {self.mosaic_version!r}")
        if self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"MosaicConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.mosaic_version == 1:
            self._resolve_v1()
        else:
            self._resolve_v2()
        self._check_unsupported()
        super().__post_init__()

    def _resolve_v1(self) -> None:
        if self.add_bias_linear is None:
            self.add_bias_linear = True
        if self.normalization is None:
            self.normalization = "LayerNorm"
        if self.gated_linear_unit is None:
            self.gated_linear_unit = False
        if self.persistent_memory_size < 0:
            raise ValueError(f"MosaicConfig.persistent_memory_size must be >= 0, got {self.persistent_memory_size}")
        if self.persistent_memory_size == 0:
            self.persistent_memory_size = int(round(3.5 * self.hidden_size))

    def _resolve_v2(self) -> None:
        if self.add_bias_linear is None:
            self.add_bias_linear = False
        if self.add_bias_linear:
            raise ValueError("MosaicConfig.add_bias_linear must be False for mosaic_version=2 (no biases in v2)")
        if self.normalization is None:
            self.normalization = "RMSNorm"
        if self.gated_linear_unit is False:
            raise ValueError("MosaicConfig.gated_linear_unit must be True for mosaic_version=2 (SwiGLU)")
        self.gated_linear_unit = True
        if self.activation_func not in (F.gelu, F.silu):  # gelu is Megatron's untouched default
            raise ValueError("MosaicConfig.activation_func must be SiLU for mosaic_version=2 (SwiGLU)")
        self.activation_func = F.silu
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 3 * self.hidden_size
        low, high = self.long_term_delay_range
        if not 1 <= low <= high:
            raise ValueError(f"MosaicConfig.long_term_delay_range must satisfy 1 <= low <= high, got {(low, high)}")
        self.long_term_delay_range = (int(low), int(high))
        if self.short_term_window < 1:
            raise ValueError(f"MosaicConfig.short_term_window must be >= 1, got {self.short_term_window}")
        if self.long_term_inference_delay < 1:
            raise ValueError(
                f"MosaicConfig.long_term_inference_delay must be >= 1, got {self.long_term_inference_delay}"
            )
        # Embedding and output layer: σ = 1/√(2d); per-layer σ are built by the layers themselves.
        std = 1.0 / math.sqrt(2.0 * self.hidden_size)
        if self.embedding_init_method is None:
            if self.embedding_init_method_std is None:
                self.embedding_init_method_std = std
            self.embedding_init_method = truncated_normal_init(self.embedding_init_method_std)
        if self.init_method is None:
            self.init_method = truncated_normal_init(std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = truncated_normal_init(std)

    def _check_unsupported(self) -> None:
        if self.attention_dropout != 0.0:
            raise ValueError(
                "MosaicConfig.attention_dropout must be 0: memory retrieval has no attention dropout "
                "(use hidden_dropout for the residual dropout of the official code)"
            )
        # recompute_granularity 'full' (TransformerBlock recomputes whole layers; the
        # MemoryContext rides in packed_seq_params, which it closes over) and 'selective' with
        # 'core_attn' (each memory recomputes its scans and retrieval, model/recompute.py) work;
        # Megatron's own checks validate the method and layer count.
        if self.recompute_granularity == "selective" and set(self.recompute_modules or ()) - {"core_attn"}:
            raise ValueError(
                f"MosaicConfig.recompute_modules {self.recompute_modules}: Mosaic layers recompute "
                "only 'core_attn' (the memories' scans and retrievals)"
            )

    @property
    def head_dim(self) -> int:
        """hs = hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults, JSON-friendly; see ``config_to_dict``."""
        return config_to_dict(self)


@dataclasses.dataclass
class GPTBaselineConfig(TransformerConfig):
    """TransformerConfig of the GPT baseline plus ``init_seed`` (as in MosaicConfig)."""

    init_seed: Optional[int] = None
    """Seed of the initial weights, one stream per layer / embedding / output layer / final
    norm (see ``model.init_rng``); None draws from the ambient generators."""


# --------------------------------------------------------------------------- serialization

_CONFIG_CLASSES = {"MosaicConfig": MosaicConfig, "GPTBaselineConfig": GPTBaselineConfig,
                   "TransformerConfig": TransformerConfig}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _encode(value: Any) -> Any:
    """JSON-friendly encoding, or ``dataclasses.MISSING`` for values that are rebuilt, not saved."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, enum.Enum):
        return {"enum": value.name}
    if isinstance(value, (tuple, list)):
        items = [_encode(v) for v in value]
        return dataclasses.MISSING if any(v is dataclasses.MISSING for v in items) else items
    if value in (F.silu, F.gelu, F.relu):
        return {"activation": value.__name__}
    return dataclasses.MISSING  # callables (init methods), process groups, caches


def _decode(value: Any, default: Any) -> Any:
    if isinstance(value, dict):
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "enum" in value:
            if not isinstance(default, enum.Enum):
                raise ValueError(f"cannot decode enum {value} for a field without an enum default")
            return type(default)[value["enum"]]
        if "activation" in value:
            return getattr(F, value["activation"])
    if isinstance(value, list) and isinstance(default, tuple):
        return tuple(value)
    return value


def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """Fields that differ from the class defaults (init methods and other callables are rebuilt
    by ``__post_init__``), plus ``_class``. Round trip: ``config_from_dict(config_to_dict(c))``."""
    out: dict[str, Any] = {"_class": type(config).__name__}
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        encoded = _encode(value)
        if encoded is dataclasses.MISSING:
            continue
        default = _field_default(f)
        if default is not dataclasses.MISSING and _encode(default) == encoded:
            continue
        out[f.name] = encoded
    return out


def config_from_dict(d: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """Rebuild a MosaicConfig / TransformerConfig saved by ``config_to_dict``.

    ``overrides`` replace saved fields (e.g. a different tensor_model_parallel_size).
    Unknown keys raise a ValueError naming them.
    """
    cls_name = d.get("_class", "MosaicConfig")
    if cls_name not in _CONFIG_CLASSES:
        raise ValueError(f"config dict: unknown _class {cls_name!r}, expected one of {sorted(_CONFIG_CLASSES)}")
    cls = _CONFIG_CLASSES[cls_name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in d.items() if k != "_class"}
    values.update(overrides)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config dict: unknown {cls_name} fields {unknown}")
    kwargs = {k: _decode(v, _field_default(fields[k])) for k, v in values.items()}
    return cls(**kwargs)


def mosaic_config_from_dict(d: dict[str, Any], **overrides: Any) -> MosaicConfig:
    """``MosaicConfig`` from ``MosaicConfig.to_dict()`` output (``overrides`` win)."""
    d = dict(d)
    d.setdefault("_class", "MosaicConfig")
    if d["_class"] != "MosaicConfig":
        raise ValueError(f"mosaic_config_from_dict: dict holds a {d['_class']}, not a MosaicConfig")
    config = config_from_dict(d, **overrides)
    assert isinstance(config, MosaicConfig)
    return config
