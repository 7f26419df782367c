"""Analytic training FLOPs per iteration, for ``--log-throughput`` (TFLOP/s per device).

As Megatron-LM's ``num_floating_point_operations``: a multiply-add is 2 FLOPs and a training step
costs 3 forward passes (forward + backward's two matmuls per weight). Per token, the forward costs
- 2 x every matrix weight that multiplies it once: projections, the SwiGLU MLP, v1's persistent
  memory slots (P keys and P values per head are scored and mixed like a weight matrix) and the
  output layer (the embedding lookup costs nothing). Counted from the built model, so each
  model's real layer structure is used; TP shards are summed over the model-parallel group;
- 4 x d per (query, key) pair a query retrieves from: scores and weighted values. The pairs are
  each model's visibility rule on a sequence of --seq-length without document breaks:
  gpt: causal (t + 1 keys); mosaic-v1 contextual memory: the t earlier pairs; mosaic-v2 short-term
  memory: min(t, h - 1) pairs; long-term memory: pairs at least m back, averaged over the
  training delays m ~ U{low..high} (each kind's ``visible_pairs`` in model_kinds.KINDS).
Key recurrences, norms and softmax are O(T d) and left out, as Megatron-LM leaves them out.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mosaic.training.initialize import device
from megatron_mosaic.training.model_kinds import kind_of
from megatron_mosaic.training.optimizer import counts_toward_norm


def matmul_weights(model_chunks: Sequence[torch.nn.Module], tied_output: int = 0) -> int:
    """Matrix-weight elements applied once per token, over the whole model (all TP/PP ranks).

    ``tied_output``: hidden x vocab of an output layer that reuses the embedding (v1)."""
    from megatron_mosaic.model.fused_projection import logical_tensors  # fused projections' pad: no useful work

    local = 0
    for chunk in model_chunks:
        for name, param in logical_tensors(chunk, dict(chunk.named_parameters())).items():
            if param.ndim >= 2 and "word_embeddings" not in name and counts_toward_norm(param):
                local += param.numel()
    # on the compute device: NCCL reduces CUDA tensors only
    total = torch.tensor(float(local), dtype=torch.float64, device=device())
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item()) + tied_output


def mean_visible_pairs(args: argparse.Namespace) -> float:
    """Retrieved (query, key) pairs per token per layer, summed over the layer's memories."""
    return kind_of(args).visible_pairs(args)


def flops_per_sample(args: argparse.Namespace, weights: int) -> float:
    """Training FLOPs for one sequence of --seq-length tokens."""
    per_token = 2.0 * weights + 4.0 * args.hidden_size * args.num_layers * mean_visible_pairs(args)
    return 3.0 * per_token * args.seq_length


def model_flops_per_sample(args: argparse.Namespace, model_chunks: Sequence[torch.nn.Module]) -> float:
    tied = args.hidden_size * args.padded_vocab_size if kind_of(args).tied_output else 0
    return flops_per_sample(args, matmul_weights(model_chunks, tied_output=tied))
