"""Shared helpers of the model tests: tiny configs, a 1-rank Megatron setup, TP weight slicing."""

from __future__ import annotations


import torch
import torch.distributed as dist

from megatron_mosaic.model import MosaicConfig, gpt_baseline_config
from megatron_mosaic.training.initialize import single_rank_megatron  # noqa: F401  (re-exported for the tests)

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
VOCAB, SEQ, BATCH = 64, 16, 2
EOD = 3


def tiny_config(version: int, tp: int = 1, **overrides) -> MosaicConfig:
    extra = dict(persistent_memory_size=8) if version == 1 else dict(short_term_window=5, long_term_delay_range=(2, 6))
    return MosaicConfig(mosaic_version=version, tensor_model_parallel_size=tp, **{**TINY, **extra, **overrides})


def tiny_gpt_config(tp: int = 1, **overrides):
    return gpt_baseline_config(tensor_model_parallel_size=tp, **{**TINY, **overrides})


def randomize_per_head_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move 1-D per-head scalars away from their (often constant) inits so head mix-ups show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if getattr(p, "tensor_model_parallel", False) and p.dim() == 1 and "bias" not in name:
                p.add_(0.03 * torch.randn(p.shape, generator=generator))


def packed_tokens(generator: torch.Generator, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """Random tokens (never EOD) with EODs placed to give 2-3 documents per row."""
    tokens = torch.randint(EOD + 1, VOCAB, (batch, seq), generator=generator)
    tokens[0, 5] = EOD
    tokens[0, 11] = EOD
    tokens[1, 8] = EOD
    return tokens


def logical_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """named_parameters() with each memory's fused projection seen as its separate linears
    (views of the fused weight: copying into them sets the model's weights)."""
    from megatron_mosaic.model.fused_projection import logical_tensors

    return logical_tensors(model, dict(model.named_parameters()))


def logical_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients by parameter name, each fused projection's split into its parts (which carry
    the TP attributes, so TP=2 and TP=1 compare part by part whatever the padding)."""
    from megatron_mosaic.model.fused_projection import logical_tensors

    return logical_tensors(model, {n: p.grad for n, p in model.named_parameters()})


def is_glu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def shard_of(name: str, param: torch.nn.Parameter, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a full (TP=1) tensor, following Megatron's partition attributes."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if is_glu_fc1(name):  # [W1; W3] is split as [W1_r; W3_r] per rank
        w1, w3 = full.chunk(2, dim=dim)
        return torch.cat([w1.chunk(size, dim=dim)[rank], w3.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def gather_full(name: str, param: torch.nn.Parameter, local: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``shard_of`` over the TP group (all-gather)."""
    size = dist.get_world_size(group)
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim = param.partition_dim
    if is_glu_fc1(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)
