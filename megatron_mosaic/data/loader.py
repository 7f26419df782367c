"""Micro-batches for training, resumable at an exact sample.

As Megatron-LM's ``MegatronPretrainingSampler``: global batch ``g`` is the samples
``[start + g*B*DP, start + (g+1)*B*DP)`` of the dataset (already shuffled by ``GPTDataset``),
data-parallel rank ``r`` takes the ``r``-th slice of ``B`` of it, and ``start`` is the number of
samples consumed before a restart, so a resumed run sees exactly the batches an uninterrupted one
would have seen.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset


class PretrainingSampler:
    """Index lists of one data-parallel rank's micro-batches, from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        full, rest = divmod(self.total_samples - self.consumed_samples, self.global_micro_batch)
        start = self.data_parallel_rank * self.micro_batch_size
        return full + int(not self.drop_last and rest > start)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples, self.global_micro_batch):
            batch = list(range(first, min(first + self.global_micro_batch, self.total_samples)))
            if len(batch) < self.global_micro_batch and self.drop_last:
                return
            mine = batch[start:start + self.micro_batch_size]
            if mine:
                yield mine


def build_data_loader(dataset: Optional[Dataset], consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_workers: int = 0, drop_last: bool = True) -> Optional[DataLoader]:
    """A DataLoader of collated micro-batches (dicts of (B, seq_length) tensors), or None."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size, drop_last)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def cyclic(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a loader forever (evaluation restarts from its first batch)."""
    while True:
        yield from loader
