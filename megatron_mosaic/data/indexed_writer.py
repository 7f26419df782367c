"""The ``.bin/.idx`` pair of one output prefix, written so that a crash never leaves a ``.bin``
paired with an ``.idx`` that looks valid for it.

Both files are written under temporary names and renamed only after the ``.idx`` is complete;
the old ``.idx`` is removed before the new ``.bin`` takes its place. The pair itself is written
by megatron-core's ``IndexedDatasetBuilder`` and read back by its ``IndexedDataset``.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_mosaic.data.corpus import incomplete_path


class AtomicIndexedWriter:
    """An ``IndexedDatasetBuilder`` that writes under temporary names until ``commit``."""

    def __init__(self, prefix: str, dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.tmp_bin, self.tmp_idx = incomplete_path(prefix + ".bin"), incomplete_path(prefix + ".idx")
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add_document(self, ids: np.ndarray, lengths: list[int]) -> None:
        self.builder.add_document(ids, lengths)
        self.documents += 1
        self.tokens += int(ids.size)

    def add_dataset(self, prefix: str) -> None:
        """Append a whole finished dataset (a partition's output)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        self.documents += len(dataset.document_indices) - 1
        self.tokens += int(dataset.sequence_lengths.sum())
        del dataset
        self.builder.add_index(prefix)

    def commit(self) -> None:
        self.builder.finalize(self.tmp_idx)
        final_bin, final_idx = self.prefix + ".bin", self.prefix + ".idx"
        # The .idx is what makes a prefix look valid: drop the old one first, rename it last.
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self.tmp_bin, final_bin)
        os.replace(self.tmp_idx, final_idx)

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        finally:
            for path in (self.tmp_bin, self.tmp_idx):
                if os.path.exists(path):
                    os.remove(path)
