"""Mosaic blocks as Megatron-Core TransformerLayer replacements.

TransformerBlock drives them like its own layers: ``forward(hidden_states [s, b, d],
attention_mask=None, context=None, packed_seq_params=MemoryContext, **kwargs) ->
(hidden_states, context)``. The MemoryContext (layout, long-term delay, fast-path flags, CP
group) travels in the ``packed_seq_params`` slot, which TransformerBlock hands unchanged to
every layer, also when it recomputes them (model/context.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from .config import MosaicConfig, truncated_normal_init
from .context import MemoryContext
from .init_rng import global_layer_number, init_rng, init_seed_of, layer_stream
from .module import MosaicModule


@dataclass
class MosaicV1LayerSubmodules:
    """v1 block: x += CM(LN₁ x); x += PM(LN₂ x)."""

    input_layernorm: Union[ModuleSpec, type] = None
    contextual_memory: Union[ModuleSpec, type] = None
    pre_persistent_layernorm: Union[ModuleSpec, type] = None
    persistent_memory: Union[ModuleSpec, type] = None


@dataclass
class MosaicV2LayerSubmodules:
    """v2 block: x += W_o[STM(N x); LTM(N x)]; x += SwiGLU(N x)."""

    input_layernorm: Union[ModuleSpec, type] = None
    memory: Union[ModuleSpec, type] = None
    pre_mlp_layernorm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class MosaicLayer(MosaicModule, BaseTransformerLayer):
    """Common part of both blocks: layer numbering (global, 1-based, like TransformerLayer),
    the layer's initialisation stream, the MemoryContext check and the residual dropout."""

    def __init__(self, config: MosaicConfig, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, vp_stage: Optional[int] = None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        MosaicModule.__init__(self, config, pg_collection.tp)
        BaseTransformerLayer.__init__(self)
        self.pg_collection = pg_collection
        self.layer_number = global_layer_number(config, layer_number, vp_stage, pg_collection)
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout

    def _init_rng(self):
        """Scope of this layer's initial draws: its own stream of (init_seed, global layer
        number), so the layer starts from the same weights whichever stage builds it."""
        return init_rng(init_seed_of(self.config), layer_stream(self.layer_number))

    def _norm(self, spec) -> Any:
        return build_module(spec, config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)

    def _dropout(self, x: Tensor) -> Tensor:
        # x is replicated over TP; the default RNG is seeded alike on TP ranks, so masks agree.
        return F.dropout(x, p=self.hidden_dropout, training=self.training)

    @staticmethod
    def _memory_context(packed_seq_params: Any, kwargs: dict) -> MemoryContext:
        # The context rides in the packed_seq_params slot (model/context.py); a real THD
        # PackedSeqParams or none at all means the layer was driven by something else.
        if not isinstance(packed_seq_params, MemoryContext):
            raise TypeError(
                "Mosaic layers take their MemoryContext in TransformerBlock's packed_seq_params "
                f"slot, got {type(packed_seq_params).__name__}; build the model with MosaicModel"
            )
        if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("Mosaic layers have no Megatron inference-context (KV cache) support")
        return packed_seq_params

    def _finish(self, x: Tensor) -> Tensor:
        # Pipeline schedules free the output's storage: it must not be a view (as TransformerLayer).
        return make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True)


class MosaicV1Layer(MosaicLayer):
    """Memory Mosaics v1 block (official nanoMosaics ``Block``): pre-norm LayerNorm, contextual
    memory, persistent memory. Inits: config.init_method / output_layer_init_method
    (Megatron defaults N(0, 0.02) and N(0, 0.02/√(2L)), the official values)."""

    def __init__(self, config: MosaicConfig, submodules: MosaicV1LayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None):
        super().__init__(config, layer_number, hidden_dropout, pg_collection, vp_stage)
        inits = dict(init_method=config.init_method, output_init_method=config.output_layer_init_method)
        with self._init_rng():
            self.input_layernorm = self._norm(submodules.input_layernorm)
            self.contextual_memory = build_module(submodules.contextual_memory, config=config, tp_group=self.tp_group, **inits)
            self.pre_persistent_layernorm = self._norm(submodules.pre_persistent_layernorm)
            self.persistent_memory = build_module(submodules.persistent_memory, config=config, tp_group=self.tp_group, **inits)

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, context: Any = None,
                packed_seq_params: Optional[MemoryContext] = None, **kwargs: Any):
        """hidden_states [s, b, d] -> ([s, b, d], context); attention_mask is unused (None)."""
        memory_context = self._memory_context(packed_seq_params, kwargs)
        x = hidden_states + self._dropout(self.contextual_memory(self.input_layernorm(hidden_states), memory_context))
        x = x + self._dropout(self.persistent_memory(self.pre_persistent_layernorm(x), memory_context))
        return self._finish(x), context


class MosaicV2Layer(MosaicLayer):
    """Memory Mosaics v2 block: RMSNorm, short+long-term memory with one W_o, SwiGLU MLP.

    Init (spec section 3): truncated normal ±3σ, σ = 1/√(2d(l+1)) for every projection of block
    l (0-based global index) except W₂ (mlp.linear_fc2): σ = 1/√(2d'(l+1)).
    """

    def __init__(self, config: MosaicConfig, submodules: MosaicV2LayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None):
        super().__init__(config, layer_number, hidden_dropout, pg_collection, vp_stage)
        depth = self.layer_number  # l + 1
        init = truncated_normal_init(1.0 / math.sqrt(2.0 * config.hidden_size * depth))
        init_fc2 = truncated_normal_init(1.0 / math.sqrt(2.0 * config.ffn_hidden_size * depth))
        # Megatron's MLP reads its inits from its config: give it a per-layer copy.
        mlp_config = copy.copy(config)
        mlp_config.init_method, mlp_config.output_layer_init_method = init, init_fc2
        with self._init_rng():
            self.input_layernorm = self._norm(submodules.input_layernorm)
            self.memory = build_module(submodules.memory, config=config, tp_group=self.tp_group, init_method=init)
            self.pre_mlp_layernorm = self._norm(submodules.pre_mlp_layernorm)
            self.mlp = build_module(submodules.mlp, config=mlp_config, ffn_hidden_size=config.ffn_hidden_size,
                                    tp_group=self.tp_group)

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, context: Any = None,
                packed_seq_params: Optional[MemoryContext] = None, **kwargs: Any):
        """hidden_states [s, b, d] -> ([s, b, d], context); attention_mask is unused (None)."""
        memory_context = self._memory_context(packed_seq_params, kwargs)
        x = hidden_states + self._dropout(self.memory(self.input_layernorm(hidden_states), memory_context))
        out, bias = self.mlp(self.pre_mlp_layernorm(x))
        if bias is not None:
            out = out + bias
        x = x + self._dropout(out)
        return self._finish(x), context
