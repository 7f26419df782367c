"""Datasets and per-rank micro-batch iterators for the training loop."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_mosaic.data.loader import build_data_loader, cyclic
from megatron_mosaic.training.mock_data import SyntheticDataset


@dataclass
class DataSources:
    train: Any  # map-style datasets of GPTDataset samples (tokens, labels, loss_mask, position_ids)
    valid: Optional[Any]
    vocab_size: int
    eod_token_id: Optional[int]


def build_data(args: argparse.Namespace) -> DataSources:
    """Datasets and vocabulary: synthetic for --mock-data, else the preprocessed corpus."""
    train_samples = (getattr(args, "train_samples", None)
                     or max(args.train_iters, 1) * args.global_batch_size)
    valid_samples = max(args.eval_iters, args.per_position_eval_iters, 1) * args.global_batch_size
    if args.mock_data:
        return _mock_data(args, train_samples, valid_samples)
    from megatron_mosaic.data.datasets import build_train_valid_test_datasets
    from megatron_mosaic.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(args)
    train, valid, _ = build_train_valid_test_datasets(
        args, tokenizer, args.seq_length, args.seed, [train_samples, valid_samples, None])
    if train is None:
        raise ValueError(f"--split {args.split} leaves no training data")
    return DataSources(train=train, valid=valid, vocab_size=tokenizer.vocab_size,
                       eod_token_id=tokenizer.eod)


def _mock_data(args: argparse.Namespace, train_samples: int, valid_samples: int) -> DataSources:
    """Synthetic tokens over --vocab-size ids, or over the --tokenizer-type's vocabulary with its
    EOD splitting documents (as Megatron-LM's mock data uses the tokenizer when one is named)."""
    vocab, eod = args.vocab_size, None
    if args.tokenizer_type is not None:
        from megatron_mosaic.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(args)
        vocab, eod = tokenizer.vocab_size, tokenizer.eod
    return DataSources(
        train=SyntheticDataset(train_samples, args.seq_length, vocab, seed=args.seed, eod_token_id=eod),
        valid=SyntheticDataset(valid_samples, args.seq_length, vocab, seed=args.seed + 1, eod_token_id=eod),
        vocab_size=vocab, eod_token_id=eod)


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
