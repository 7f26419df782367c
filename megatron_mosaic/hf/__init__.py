"""Hugging Face side of megatron_mosaic: configuration, modeling with a decoding cache, conversion.

``configuration_memory_mosaic``, ``cache_memory_mosaic`` and ``modeling_memory_mosaic`` are
self-contained (torch + transformers) and are copied into every exported model directory.
"""

from .cache_memory_mosaic import MosaicCache
from .configuration_memory_mosaic import MemoryMosaicConfig
from .modeling_memory_mosaic import MemoryMosaicForCausalLM, MemoryMosaicModel

__all__ = ["MemoryMosaicConfig", "MemoryMosaicForCausalLM", "MemoryMosaicModel", "MosaicCache"]
