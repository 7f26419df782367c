"""Checkpoints saved by real TP=2 / PP=2 runs, with the Megatron model's logits as reference.

``save_checkpoints`` runs inside a 2-rank ``run_distributed`` spawn: for every spec it builds the
model at that layout, perturbs its parameters (so per-head scalars differ between heads and a
head mix-up cannot pass), saves a checkpoint with the training code and returns the full
logits of the parallel model on fixed tokens. ``load_and_forward`` loads a checkpoint at a given
layout (the layout-independence of imported checkpoints) and returns logits the same way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

EOD = 3
PADDED_VOCAB = 128
CONSUMED = 14  # samples consumed by the saving run (7 iterations x 2): carried through export and import
SEQ = 24

# name: (model, TP, PP)
SPECS = {
    "v1_tp2": ("mosaic-v1", 2, 1),
    "v2_tp2": ("mosaic-v2", 2, 1),
    "v1_pp2": ("mosaic-v1", 1, 2),
    "v2_pp2": ("mosaic-v2", 1, 2),
    "gpt_tp2": ("gpt", 2, 1),
}


def reference_tokens(model: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(4, 100, (2, SEQ), generator=gen)
    if model != "gpt":  # HF Llama has no document masking: the baseline is compared on one document
        ids[0, 7] = EOD
        ids[1, 15] = EOD
    return ids


def run_args(model: str, tp: int, pp: int, extra: dict | None = None):
    from megatron_mosaic.training.arguments import parse_args

    argv = ["--model", model, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--mock-data", "--vocab-size", "100", "--short-term-window", "8",
            "--long-term-inference-delay", "4", "--persistent-memory-size", "24", "--ffn-hidden-size", "48",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    args = parse_args(argv, world_size=2)
    args.padded_vocab_size = PADDED_VOCAB
    args.eod_token_id = EOD
    for key, value in (extra or {}).items():
        setattr(args, key, value)
    return args


def _perturb(chunks, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                # The (tied) embedding / output copies must stay equal across pipeline stages.
                if "word_embeddings" in name or "output_layer" in name:
                    continue
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _forward(chunk, tokens: torch.Tensor, tp: int, pp: int) -> torch.Tensor | None:
    """Full (B, T, V) logits on the last pipeline rank, None elsewhere."""
    from megatron.core import parallel_state

    with torch.no_grad():
        if pp == 1:
            logits = chunk(tokens)
        else:
            stage = parallel_state.get_pipeline_model_parallel_rank()
            hidden_shape = (tokens.shape[1], tokens.shape[0], chunk.config.hidden_size)
            if stage == 0:
                dist.send(chunk(tokens).contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                return None
            received = torch.empty(hidden_shape)
            dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor([received])
            logits = chunk(tokens)
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _setup(tp: int, pp: int, seed: int) -> None:
    from megatron.core import parallel_state

    from megatron_mosaic.training import cuda_compat
    from megatron_mosaic.training.initialize import set_random_seeds

    cuda_compat.apply()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_random_seeds(seed)


def save_checkpoints(rank: int, world_size: int, root: str, extra_args: dict) -> dict:
    from megatron.core import parallel_state

    from megatron_mosaic.training.arguments import args_to_dict
    from megatron_mosaic.training.checkpointing import save_checkpoint
    from megatron_mosaic.training.model_builder import build_model

    results = {}
    for index, (name, (model, tp, pp)) in enumerate(SPECS.items()):
        _setup(tp, pp, seed=100 + index)
        args = run_args(model, tp, pp, extra_args.get(name))
        chunks = build_model(args)
        _perturb(chunks, seed=1000 * index)  # same on TP ranks: replicated parameters stay equal
        for chunk in chunks:
            chunk.eval()
        save_checkpoint(os.path.join(root, name), 7, chunks, args=args_to_dict(args), consumed_samples=CONSUMED)
        logits = _forward(chunks[0], reference_tokens(model), tp, pp)
        if logits is not None:
            results[name] = logits
        parallel_state.destroy_model_parallel()
    return results


def load_and_forward(rank: int, world_size: int, jobs: list) -> dict:
    """jobs: (name, checkpoint dir, model, TP, PP) -> logits of the loaded parallel model."""
    from megatron.core import parallel_state

    from megatron_mosaic.training.checkpointing import load_checkpoint, read_checkpoint_args
    from megatron_mosaic.training.model_builder import build_model

    results = {}
    for name, path, model, tp, pp in jobs:
        _setup(tp, pp, seed=5)
        saved = read_checkpoint_args(path)
        args = run_args(model, tp, pp, {"eod_token_id": saved["eod_token_id"]})
        chunks = build_model(args)
        loaded = load_checkpoint(path, chunks, load_rng=False)
        chunks[0].eval()
        logits = _forward(chunks[0], reference_tokens(model), tp, pp)
        if logits is not None:
            results[name] = (logits, loaded["iteration"])
        parallel_state.destroy_model_parallel()
    return results
