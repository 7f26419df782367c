"""The layers of the Hugging Face Memory Mosaic model and the decoder that stacks them.

Norms, v2's SwiGLU, the v1 and v2 layers, the token embedding and the decoder, with parameter
names that mirror megatron_mosaic.model's state dict (TP=1); the memories they hold are in
memories_memory_mosaic.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration_memory_mosaic import MemoryMosaicConfig
from .memories_memory_mosaic import ContextualMemory, PersistentMemory, ShortLongTermMemory, StepContext


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
