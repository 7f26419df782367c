"""Megatron-Core integration of Memory Mosaics: config, layers, specs, MosaicModel, GPT baseline."""

from .config import GPTBaselineConfig, MosaicConfig, config_from_dict, config_to_dict, mosaic_config_from_dict
from .context import MemoryContext
from .delay import sample_long_term_delay
from .gpt_baseline import GPTBaseline, build_gpt_baseline, gpt_baseline_config
from .layers import MosaicV1Layer, MosaicV2Layer
from .mosaic_model import MosaicModel
from .specs import (
    get_gpt_baseline_block_spec,
    get_gpt_baseline_layer_spec,
    get_mosaic_block_spec,
    get_mosaic_layer_local_spec,
    get_mosaic_layer_te_spec,
)

__all__ = [
    "GPTBaseline",
    "GPTBaselineConfig",
    "MemoryContext",
    "MosaicConfig",
    "MosaicModel",
    "MosaicV1Layer",
    "MosaicV2Layer",
    "build_gpt_baseline",
    "config_from_dict",
    "config_to_dict",
    "get_gpt_baseline_block_spec",
    "get_gpt_baseline_layer_spec",
    "get_mosaic_block_spec",
    "get_mosaic_layer_local_spec",
    "get_mosaic_layer_te_spec",
    "gpt_baseline_config",
    "mosaic_config_from_dict",
    "sample_long_term_delay",
]
