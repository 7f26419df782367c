"""Scoring under context parallelism: the Megatron model's own CP path runs each sequence.

One process per CP rank (``torchrun --nproc_per_node=CP tools/evaluate.py ...``). Every rank
generates the same seeded documents and holds the full token ids; the model sees only the
rank's two load-balanced chunks (``megatron_mosaic.parallel``: ring recall, cross-rank
recurrences and peeks, RoPE at global positions for the baseline). Each rank turns its logits
into next-token log-probabilities and argmax predictions for its own positions, and only those
(B, 2c) tensors are gathered: the (T, vocabulary) logits of a long sequence never exist whole
on any rank. The checkpoint (saved at any TP/PP/CP layout) is loaded resharded to TP=PP=1.
Weights and compute are fp32, as on the single-process path, so both give the same scores.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .model_runner import ID_TOKENIZERS, LoadedModel, feeding


def init_context_parallel(cp: int) -> None:
    """The process group (torchrun's environment) and Megatron's groups with CP = world size."""
    from megatron.core import parallel_state

    from megatron_mosaic.training.initialize import start_process_group

    start_process_group()
    if dist.get_world_size() != cp:
        raise ValueError(f"--context-parallel-size {cp} needs exactly {cp} processes "
                         f"(torchrun --nproc_per_node={cp}), got {dist.get_world_size()}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)


def load_megatron_for_cp(path: str, vocab_size: Optional[int] = None,
                         num_symbols: Optional[int] = None) -> LoadedModel:
    """The checkpoint's Megatron model at TP=PP=1 in the current CP group, scoring by its CP path."""
    from megatron_mosaic.hf.export import build_hf_tokenizer
    from megatron_mosaic.training.arguments import args_from_dict
    from megatron_mosaic.training.checkpoint_state import read_checkpoint_args
    from megatron_mosaic.training.checkpointing import load_checkpoint
    from megatron_mosaic.training.model_builder import build_model

    saved = read_checkpoint_args(path)
    # The layout is this run's, not the saved one; evaluation needs no recomputation, no
    # sequence parallelism (TP=1) and runs in fp32 like the single-process HF path.
    args = args_from_dict(saved, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                          virtual_pipeline_model_parallel_size=None,
                          context_parallel_size=dist.get_world_size(), sequence_parallel=False,
                          recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                          bf16=False, fp8_format=None)
    [model] = build_model(args)  # on this rank's compute device
    load_checkpoint(path, [model], load_rng=False)
    model.eval()
    tokenizer = build_hf_tokenizer(saved) if saved.get("tokenizer_type") not in ID_TOKENIZERS else None
    vocab, encode = feeding(path, saved, tokenizer, vocab_size, num_symbols)
    # Counted as the HF model counts them: fused projections' zero pad rows are no parameters.
    from megatron_mosaic.model.fused_projection import logical_tensors

    parameters = sum(t.numel() for t in logical_tensors(model, dict(model.named_parameters())).values())
    loaded = LoadedModel(model, saved, encode, vocab, saved.get("model", "?"), parameters, saved.get("seq_length"))
    loaded.token_scores = lambda input_ids: cp_token_scores(model, args, input_ids)
    return loaded


@torch.no_grad()
def cp_token_scores(model, args, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each next token, argmax prediction), both (B, T-1), of the full rows,
    computed chunk-wise on the CP ranks. Rows are right-padded to a multiple of 2·CP (padding
    after a row's end never reaches its positions: the model is causal)."""
    from megatron.core import parallel_state

    from megatron_mosaic.model.context import micro_batch_context
    from megatron_mosaic.parallel.context_parallel import ChunkPlan, gather_from_context_parallel
    from megatron_mosaic.parallel.context_parallel import slice_batch_for_cp_rank
    from megatron_mosaic.training.initialize import device as compute_device

    group = parallel_state.get_context_parallel_group()
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, width = input_ids.shape
    padded = -(-width // (2 * cp)) * (2 * cp)
    tokens = torch.zeros(batch, padded, dtype=torch.long)
    tokens[:, :width] = input_ids
    # The next token of every position (the last has none: its score is cut off below).
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    eod = args.eod_token_id if args.document_masking else None
    local = slice_batch_for_cp_rank({"tokens": tokens, "labels": labels}, eod, args.document_masking, cp, rank)
    device = compute_device()
    local_tokens, local_labels = local["tokens"].to(device), local["labels"].to(device)
    context = micro_batch_context(local_tokens, getattr(args, "long_term_inference_delay", 1),
                                  layout=local["layout"].to(device),
                                  eod_token_id=eod, cp_group=group if cp > 1 else None)
    logits = model(local_tokens, packed_seq_params=context).float()  # (B, 2c, V)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, local_labels[..., None])[..., 0]
    scores = torch.stack([logprobs, logits.argmax(-1).to(logprobs.dtype)])  # (2, B, 2c)
    full = gather_from_context_parallel(scores, ChunkPlan(padded, cp, rank), group if cp > 1 else None, seq_dim=2)
    full = full[:, :, :width - 1].cpu()
    return full[0], full[1].long()
