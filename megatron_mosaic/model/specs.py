"""ModuleSpecs for Mosaic layers (local Megatron-Core or Transformer Engine modules) and for the
Llama-style GPT baseline layer."""

from __future__ import annotations

import importlib.util
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from .config import MosaicConfig
from .core_attention import SDPACoreAttention
from .extractors import MemoryLinears
from .init_rng import FINAL_NORM, global_layer_number, init_rng, init_seed_of, layer_stream, seeded_spec
from .layers import MosaicV1Layer, MosaicV1LayerSubmodules, MosaicV2Layer, MosaicV2LayerSubmodules
from .memories import ContextualMemory, LongShortMemory, PersistentMemory
from .module import MosaicNorm


def _check_version(version: int) -> None:
    if version not in (1, 2):
        raise ValueError(f"Mosaic layer spec: version must be 1 or 2, got {version!r}")


def _mosaic_layer_spec(version: int, norm: type, column: type, row: type) -> ModuleSpec:
    linears = MemoryLinears(column=column, row=row)
    if version == 1:
        return ModuleSpec(
            module=MosaicV1Layer,
            submodules=MosaicV1LayerSubmodules(
                input_layernorm=norm,
                contextual_memory=ModuleSpec(module=ContextualMemory, submodules=linears),
                pre_persistent_layernorm=norm,
                persistent_memory=ModuleSpec(module=PersistentMemory, submodules=linears),
            ),
        )
    return ModuleSpec(
        module=MosaicV2Layer,
        submodules=MosaicV2LayerSubmodules(
            input_layernorm=norm,
            memory=ModuleSpec(module=LongShortMemory, submodules=linears),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_mosaic_layer_local_spec(version: int) -> ModuleSpec:
    """Mosaic layer built from Megatron-Core modules only (runs on CPU and GPU)."""
    _check_version(version)
    return _mosaic_layer_spec(version, MosaicNorm, ColumnParallelLinear, RowParallelLinear)


def get_mosaic_layer_te_spec(version: int) -> ModuleSpec:
    """Mosaic layer with Transformer Engine linears and norms (same parameter names).

    Raises ImportError when transformer-engine is not installed (megatron-core then only has
    placeholders for the TE classes).
    """
    _check_version(version)
    if importlib.util.find_spec("transformer_engine") is None:
        raise ImportError(
            "get_mosaic_layer_te_spec needs NVIDIA transformer-engine, which is not installed "
            "(it requires CUDA: pip install --no-build-isolation transformer-engine[pytorch]). "
            "Use get_mosaic_layer_local_spec(version) instead."
        )
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

    return _mosaic_layer_spec(version, TENorm, TEColumnParallelLinear, TERowParallelLinear)


def get_mosaic_block_spec(
    config: MosaicConfig, layer_spec: ModuleSpec, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the final norm (the layers' own norm class, so v1's
    LayerNorm bias follows add_bias_linear instead of Megatron's always-biased fallback), built
    in its own initialisation stream."""
    num_layers = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers, layer_norm=seeded_spec(layer_spec.submodules.input_layernorm, FINAL_NORM)
    )


class SeededTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer built in its own initialisation stream, (init_seed, global
    layer number), like the Mosaic layers: the same weights whichever pipeline stage builds it."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None):
        number = global_layer_number(config, layer_number, vp_stage, pg_collection)
        with init_rng(init_seed_of(config), layer_stream(number)):
            super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                             pg_collection=pg_collection, vp_stage=vp_stage)


def get_gpt_baseline_layer_spec() -> ModuleSpec:
    """Megatron's local GPT layer, Llama-style (RMSNorm; SwiGLU and no bias come from the
    config), with the device-agnostic SDPA core attention instead of DotProductAttention, and
    its own initialisation stream (SeededTransformerLayer)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.module = SeededTransformerLayer
    # The Mosaic layers' norms (the same torch RMSNorm): Megatron's torch-norm fallback refuses
    # sequence parallelism, MosaicNorm marks its weights for the TP gradient sum instead.
    spec.submodules.input_layernorm = MosaicNorm
    spec.submodules.pre_mlp_layernorm = MosaicNorm
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def get_gpt_baseline_block_spec(config, vp_stage: Optional[int] = None,
                                pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's baseline layers plus Megatron's final norm, in its own stream."""
    num_layers = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[get_gpt_baseline_layer_spec()] * num_layers, layer_norm=seeded_spec(MosaicNorm, FINAL_NORM)
    )
