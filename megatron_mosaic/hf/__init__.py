"""Hugging Face side of megatron_mosaic: configuration, modeling with a decoding cache, conversion.

The ``*_memory_mosaic`` model code files (configuration, cache, memories, layers, modeling; see
export_files.MODEL_CODE_FILES) need only torch, transformers and megatron_mosaic/memory/, and are
copied into every exported model directory with that memory math.
"""

from .cache_memory_mosaic import MosaicCache
from .configuration_memory_mosaic import MemoryMosaicConfig
from .modeling_memory_mosaic import MemoryMosaicForCausalLM, MemoryMosaicModel

__all__ = ["MemoryMosaicConfig", "MemoryMosaicForCausalLM", "MemoryMosaicModel", "MosaicCache"]
