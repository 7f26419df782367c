"""Train/valid/test ``GPTDataset``s from Megatron-LM style data arguments.

A thin layer over megatron-core: ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` build the
splits from

- ``--data-path``: one prefix, or a weighted blend ``0.7 A 0.3 B`` (as separate argv items or one
  quoted string, so prefixes cannot contain whitespace), split by ``--split 949,50,1`` into
  contiguous ranges of sequences (of documents, unless they were split into sentences); or
- ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``: a prefix or blend per split.

Samples are megatron-core's: ``tokens``/``labels`` (seq_length each, labels shifted by one),
``loss_mask`` and ``position_ids``; no attention mask is materialised. Documents are packed back
to back, each ended by the tokenizer's EOD id (``tools/preprocess_data.py --append-eod``): the
model finds document boundaries from ``tokenizer.eod`` in ``tokens`` (a token right after an EOD
starts a new document), so position ids are not reset and the EOD's loss is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Callable, Optional, Sequence, Union

import numpy as np

from megatron_mosaic.data.corpus import DataError

logger = logging.getLogger(__name__)

Blend = tuple[list[str], Optional[list[float]]]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_blend(values: Union[None, str, Sequence[str]], flag: str = "--data-path") -> Optional[Blend]:
    """``["0.7", "A", "0.3", "B"]`` / ``["0.7 A 0.3 B"]`` -> (["A", "B"], [0.7, 0.3]);
    ``["A", "B"]`` -> (["A", "B"], None) (weights from dataset sizes); None/[] -> None."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    items = [item for value in values for item in value.split()]
    if not items:
        return None
    if not _is_number(items[0]):
        numbers = [item for item in items if _is_number(item)]
        if numbers:
            raise DataError(f"{flag}: weights must come first in each 'WEIGHT PREFIX' pair, found {numbers[0]!r} after a prefix")
        return items, None
    if len(items) % 2:
        raise DataError(f"{flag}: expected 'WEIGHT PREFIX' pairs, got {len(items)} items: {' '.join(items)}")
    weights, prefixes = items[0::2], items[1::2]
    for weight in weights:
        if not _is_number(weight):
            raise DataError(f"{flag}: {weight!r} is not a weight (expected 'WEIGHT PREFIX' pairs)")
    parsed = [float(w) for w in weights]
    if any(w < 0 for w in parsed) or sum(parsed) <= 0:
        raise DataError(f"{flag}: weights must be non-negative with a positive sum, got {weights}")
    for prefix in prefixes:
        if _is_number(prefix):
            raise DataError(f"{flag}: {prefix!r} is where a dataset prefix should be (expected 'WEIGHT PREFIX' pairs)")
    return prefixes, parsed


def check_dataset(prefix: str, tokenizer, flag: str) -> None:
    """Fail early, naming the file, on a missing or damaged dataset (``.bin`` against ``.idx``,
    every document) or one holding ids beyond the tokenizer's vocabulary; warn without EODs."""
    from megatron_mosaic.data.validate import validate_dataset

    # Every rank checks the index and the file sizes; the pass over the tokens is made once
    # per node (torchrun's local rank 0): training agrees on the outcome across ranks.
    scan = int(os.environ.get("LOCAL_RANK", "0")) == 0
    summary = validate_dataset(prefix, tokenizer.vocab_size if scan else None,
                               tokenizer.eod if scan else None, flag)
    if summary.num_documents == 0:
        raise DataError(f"{flag}: dataset {prefix} holds no documents")
    if summary.documents_ending_with_eod == 0:
        logger.warning("%s: no document of %s ends with the EOD id %d; without "
                       "tools/preprocess_data.py --append-eod documents cannot be told apart", flag, prefix, tokenizer.eod)


def check_split(prefixes: Sequence[str], split: str, num_samples: Sequence[Optional[int]]) -> None:
    """Every split asked for samples must get at least one sequence of every dataset.

    megatron-core splits a dataset by sequence index (``round(fraction * count)``); an empty
    split asked for a number of samples makes ``GPTDataset`` loop forever looking for tokens,
    so it is refused here (asked for ``None`` samples it is just an empty dataset).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError) as err:
        raise DataError(f"--split {split!r}: expected up to three non-negative weights like 949,50,1 ({err})") from None
    for prefix in prefixes:
        count = len(IndexedDataset(prefix).sequence_lengths)
        for name, bookends, wanted in zip(("train", "valid", "test"), matrix, num_samples):
            if wanted is None or bookends is None:
                continue
            if round(bookends[1] * count) <= round(bookends[0] * count):
                raise DataError(
                    f"--split {split}: the {name} split of {prefix} gets none of its {count} sequences; "
                    f"give the {name} split weight 0, or use --{name}-data-path")


def get_blend_and_blend_per_split(args) -> tuple[Optional[Blend], Optional[list[Optional[Blend]]]]:
    """(blend, blend_per_split) from ``args.data_path`` or ``args.{train,valid,test}_data_path``."""
    blend = parse_blend(getattr(args, "data_path", None), "--data-path")
    per_split = [parse_blend(getattr(args, f"{name}_data_path", None), f"--{name}-data-path")
                 for name in ("train", "valid", "test")]
    if blend is not None and any(per_split):
        raise DataError("--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path")
    if blend is None and not any(per_split):
        if getattr(args, "mock_data", False):
            return None, None
        raise DataError("no training data: give --data-path or --train-data-path (or --mock-data)")
    return blend, (per_split if blend is None else None)


def build_train_valid_test_datasets(
    args,
    tokenizer,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Sequence[Optional[int]],
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> tuple:
    """(train, valid, test) datasets (None for a split that has no data).

    args: args-like with ``data_path`` or ``train/valid/test_data_path``, ``split`` (default
    "949,50,1") and optionally ``data_cache_path``, ``mmap_bin_files``, ``mock_data``,
    ``num_dataset_builder_threads``, ``reset_position_ids``, ``reset_attention_mask``,
    ``eod_mask_loss`` (all False by default).
    tokenizer: a ``megatron_mosaic.data.tokenizers.Tokenizer`` (vocab_size, eod, pad).
    train_valid_test_num_samples: samples each split must provide (``None``: one epoch).
    is_built_on_rank: megatron-core's hook; default: every rank builds (rank 0 first).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    def check() -> tuple:
        blend, blend_per_split = get_blend_and_blend_per_split(args)
        for flag, b in [("--data-path", blend)] + [
            (f"--{name}-data-path", b) for name, b in zip(("train", "valid", "test"), blend_per_split or [])
        ]:
            for prefix in (b[0] if b else []):
                check_dataset(prefix, tokenizer, flag)
        split = (getattr(args, "split", None) or "949,50,1") if blend is not None else None
        if blend is not None:
            check_split(blend[0], split, train_valid_test_num_samples)
        return blend, blend_per_split, split

    # In a process group every rank checks (the token pass once per node) and all agree on
    # the outcome before megatron-core's builder, whose barriers would otherwise hold the
    # ranks that found nothing wrong until the distributed timeout.
    from megatron_mosaic.training.faults import agree

    blend, blend_per_split, split = agree(check, "checking the data")
    cache = getattr(args, "data_cache_path", None)
    if cache is not None:
        os.makedirs(cache, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache,
        mmap_bin_files=getattr(args, "mmap_bin_files", True),
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", 1),
        tokenizer=tokenizer,
        reset_position_ids=bool(getattr(args, "reset_position_ids", False)),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
        eod_mask_loss=bool(getattr(args, "eod_mask_loss", False)),
        create_attention_mask=False,
    )
    cls = MockGPTDataset if config.mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, list(train_valid_test_num_samples),
                                           is_built_on_rank or (lambda: True), config)
    with _process_group_for_blend_cache(cache is not None):
        return tuple(builder.build())


@contextlib.contextmanager
def _process_group_for_blend_cache(needed: bool):
    """A one-process gloo group while building, when none exists and a cache is used.

    megatron-core 0.16.1's BlendedDataset calls ``torch.distributed.get_rank()`` on a cache
    miss without checking that torch.distributed is initialised (GPTDataset does check), so a
    blend with ``data_cache_path`` fails outside a distributed run. Training always runs inside
    a process group; this covers tools, notebooks and single-process tests.
    """
    import torch.distributed as dist

    if not needed or dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
