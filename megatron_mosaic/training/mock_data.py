"""``--mock-data``: synthetic token sequences that a memory model can learn in context."""

from __future__ import annotations

from typing import Optional

import numpy as np


class SyntheticDataset:
    """Deterministic in-context-learnable token sequences for ``--mock-data`` and tests.

    Sample ``i`` is a random pattern of 4..32 tokens (drawn from a generator seeded by
    ``(seed, i)``) repeated to length T + 1: unpredictable at first, then copyable from context,
    so the loss falls with position like on real text. Optional EOD tokens split documents.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0,
                 eod_token_id: Optional[int] = None):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.eod_token_id = eod_token_id

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        period = int(rng.integers(4, 33))
        low = 1 if self.eod_token_id == 0 else 0
        pattern = rng.integers(low, self.vocab_size, size=period)
        if self.eod_token_id is not None:
            pattern = np.where(pattern == self.eod_token_id, low, pattern)
            pattern[-1] = self.eod_token_id if rng.random() < 0.5 else pattern[-1]
        text = np.resize(pattern, self.seq_length + 1).astype(np.int64)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": np.ones(self.seq_length, dtype=np.float32),
                "position_ids": np.arange(self.seq_length, dtype=np.int64)}
