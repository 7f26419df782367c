"""Datasets and per-rank micro-batch iterators for the training loop."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_mosaic.data.loader import build_data_loader, cyclic


@dataclass
class DataSources:
    train: Any  # map-style datasets of GPTDataset samples (tokens, labels, loss_mask, position_ids)
    valid: Optional[Any]
    vocab_size: int
    eod_token_id: Optional[int]


def build_data(args: argparse.Namespace) -> DataSources:
    """Datasets and vocabulary: the preprocessed corpus, or Megatron's MockGPTDataset for
    --mock-data (documents of random length holding ids 1, 2, 3, ... modulo the vocabulary,
    each ending in EOD, sampled into sequences exactly as a real corpus is)."""
    train_samples = (getattr(args, "train_samples", None)
                     or max(args.train_iters, 1) * args.global_batch_size)
    valid_samples = max(args.eval_iters, args.per_position_eval_iters, 1) * args.global_batch_size
    from megatron_mosaic.data.datasets import build_train_valid_test_datasets
    from megatron_mosaic.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(_mock_tokenizer_args(args) if args.mock_data else args)
    train, valid, _ = build_train_valid_test_datasets(
        args, tokenizer, args.seq_length, args.seed, [train_samples, valid_samples, None])
    if train is None:
        raise ValueError(f"--split {args.split} leaves no training data")
    return DataSources(train=train, valid=valid, vocab_size=tokenizer.vocab_size,
                       eod_token_id=tokenizer.eod)


def _mock_tokenizer_args(args: argparse.Namespace) -> argparse.Namespace:
    """--mock-data's tokenizer: --tokenizer-type's, else NullTokenizer over --vocab-size N (ids
    0..N-1, EOD N), the pairing Megatron-LM's own mock-data example uses."""
    if args.tokenizer_type is not None:
        return args
    return argparse.Namespace(**{**vars(args), "tokenizer_type": "NullTokenizer"})


def make_iterators(args: argparse.Namespace, dataset: Any, start_sample: int, num_chunks: int,
                   cycle: bool = False) -> list[Iterator[dict]]:
    """This DP rank's micro-batches from ``start_sample`` on, one iterator per model chunk
    (interleaved schedules pull each micro-batch once per chunk)."""
    iterators = []
    for _ in range(num_chunks):
        loader = build_data_loader(dataset, start_sample, args.micro_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(),
                                   num_workers=args.num_workers)
        # Starting an iteration over a DataLoader draws its workers' base seed from the global
        # torch RNG unless the loader has its own generator. With one, building iterators
        # (every evaluation does) leaves the training RNG stream alone: needed for exact resume.
        loader.generator = torch.Generator().manual_seed(args.seed)
        iterators.append(cyclic(loader) if cycle else iter(loader))
    return iterators
