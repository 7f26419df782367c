"""Check a Megatron ``.bin/.idx`` dataset completely before training reads it.

megatron-core's ``IndexedDataset`` trusts its files: a ``.bin`` cut short fails in whatever
iteration first reads past its end (``offset must be non-negative and no greater than buffer
length``), and a token id beyond the vocabulary fails in the embedding lookup of the step that
samples it (a device assert on GPU). Here every document is checked up front, with numpy over
the memory-mapped files (the ``.bin`` is read once, in bounded chunks; nothing is copied whole):

- the ``.idx`` header, its sizes, and that its arrays fit the file;
- sequence pointers contiguous from 0, every length non-negative, document indices rising from 0
  to the sequence count;
- the ``.bin`` size exactly what the ``.idx`` describes;
- the largest token id below the vocabulary size, naming the first offending document.

Errors are ``DataError``s naming the file and what is wrong with it.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_mosaic.data.corpus import DataError

logger = logging.getLogger(__name__)

_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_HEADER_BYTES = 34  # header 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
# megatron.core.datasets.indexed_dataset.DType codes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
_CHUNK_TOKENS = 1 << 26  # 64 Mi tokens per numpy pass over the .bin (128-512 MB of pages)
_REBUILD = "rebuild it with tools/preprocess_data.py"


@dataclass
class DatasetSummary:
    prefix: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    max_token_id: int  # -1 for an empty dataset, or when the tokens were not scanned
    documents_ending_with_eod: Optional[int]  # None when no EOD id was given


def _read_index(idx_path: str):
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise DataError(f"{idx_path}: truncated index ({size} bytes, the header alone takes "
                        f"{_HEADER_BYTES}); {_REBUILD}")
    if head[:9] != _HEADER:
        raise DataError(f"{idx_path}: not a Megatron index file (bad magic {head[:9]!r})")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version}, only version 1 is supported")
    if code not in _DTYPES:
        raise DataError(f"{idx_path}: unknown token dtype code {code}")
    needed = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if size < needed:
        raise DataError(f"{idx_path}: truncated index ({size} bytes; its header announces "
                        f"{sequences} sequences and {documents - 1} documents, which need "
                        f"{needed} bytes); {_REBUILD}")
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, np.int32, sequences, _HEADER_BYTES)
    pointers = np.frombuffer(index, np.int64, sequences, _HEADER_BYTES + 4 * sequences)
    doc_indices = np.frombuffer(index, np.int64, documents, _HEADER_BYTES + 12 * sequences)
    return np.dtype(_DTYPES[code]), lengths, pointers, doc_indices


def validate_dataset(prefix: str, vocab_size: Optional[int] = None, eod_id: Optional[int] = None,
                     flag: str = "--data-path") -> DatasetSummary:
    """Check ``prefix.idx`` against ``prefix.bin`` over every document (see the module doc).

    ``vocab_size``: token ids must be below it (None: not checked). ``eod_id``: counts the
    documents that end with it (for a warning: without EODs documents cannot be told apart).
    Raises ``DataError`` starting with ``flag`` and naming the file.
    """
    try:
        key = _identity(prefix, vocab_size, eod_id)
        if key is not None and key in _checked:
            return _checked[key]
        summary = _validate(prefix, vocab_size, eod_id, flag)
        if key is not None:
            _checked[key] = summary
        return summary
    except DataError as err:
        if str(err).startswith(flag + ":"):
            raise
        raise DataError(f"{flag}: {err}") from None
    except OSError as err:  # unreadable file, I/O error while mapping
        raise DataError(f"{flag}: dataset {prefix}: {err}") from None


# Datasets already checked in this process, by file identity: a second build of the same data
# (another split, the --eval-seq-length pass) does not read it again.
_checked: dict[tuple, DatasetSummary] = {}


def _identity(prefix: str, vocab_size: Optional[int], eod_id: Optional[int]) -> Optional[tuple]:
    try:
        stats = [os.stat(prefix + suffix) for suffix in (".idx", ".bin")]
    except OSError:
        return None
    return (os.path.realpath(prefix), vocab_size, eod_id,
            *[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in stats])


def _validate(prefix: str, vocab_size: Optional[int], eod_id: Optional[int],
              flag: str) -> DatasetSummary:
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" (give the prefix without the suffix: {prefix[:-4]})"
            raise DataError(f"{flag}: no dataset {prefix}.bin/.idx{hint}: {path} does not exist")
    dtype, lengths, pointers, doc_indices = _read_index(idx_path)
    sequences = len(lengths)

    # The index itself: what megatron-core's builder writes.
    if len(doc_indices) == 0 or doc_indices[0] != 0 or doc_indices[-1] != sequences:
        first = int(doc_indices[0]) if len(doc_indices) else None
        last = int(doc_indices[-1]) if len(doc_indices) else None
        raise DataError(f"{idx_path}: document indices must run from 0 to the sequence count "
                        f"{sequences}, found {first} .. {last}; {_REBUILD}")
    if np.any(np.diff(doc_indices) < 0):
        bad = int(np.argmax(np.diff(doc_indices) < 0))
        raise DataError(f"{idx_path}: document indices decrease at document {bad}; {_REBUILD}")
    if sequences and lengths.min() < 0:
        bad = int(np.argmin(lengths))
        raise DataError(f"{idx_path}: sequence {bad} has negative length {int(lengths[bad])}")
    ends = pointers + lengths.astype(np.int64) * dtype.itemsize
    if sequences and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1])):
        bad = 0 if pointers[0] != 0 else int(np.argmax(pointers[1:] != ends[:-1])) + 1
        raise DataError(f"{idx_path}: sequence {bad} starts at byte {int(pointers[bad])}, expected "
                        f"{0 if bad == 0 else int(ends[bad - 1])} (sequences are stored back to "
                        f"back); {_REBUILD}")
    expected = int(ends[-1]) if sequences else 0
    actual = os.path.getsize(bin_path)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index describes"
        raise DataError(f"{bin_path}: {what}: {actual} bytes, but {idx_path} describes "
                        f"{expected} ({sequences} sequences of {dtype.name}); the pair does not "
                        f"belong together or a copy was cut short; {_REBUILD}")

    # Token ids: one chunked pass over the mapped .bin (skipped without a vocabulary to check).
    tokens = expected // dtype.itemsize
    max_id = -1
    ending_with_eod = None
    if tokens and (vocab_size is not None or eod_id is not None):
        data = np.memmap(bin_path, mode="r", dtype=dtype, shape=(tokens,))
        for start in range(0, tokens, _CHUNK_TOKENS):
            chunk = data[start:start + _CHUNK_TOKENS]
            chunk_max = int(chunk.max())
            if vocab_size is not None and chunk_max >= vocab_size:
                position = start + int(np.argmax(chunk >= vocab_size))
                sequence = int(np.searchsorted(pointers, position * dtype.itemsize, side="right")) - 1
                document = int(np.searchsorted(doc_indices, sequence, side="right")) - 1
                raise DataError(
                    f"{flag}: {bin_path} holds token id {int(data[position])}, beyond the "
                    f"tokenizer's vocab size {vocab_size} (token {position}, document {document}): "
                    f"was it preprocessed with another tokenizer?")
            if dtype.kind == "i" and int(chunk.min()) < 0:
                position = start + int(np.argmax(chunk < 0))
                raise DataError(f"{bin_path}: negative token id {int(data[position])} at token "
                                f"{position}")
            max_id = max(max_id, chunk_max)
        if eod_id is not None:
            # The last token of every non-empty document.
            last_sequence = doc_indices[1:] - 1
            doc_ends = ends[last_sequence[last_sequence >= 0]] // dtype.itemsize - 1
            doc_ends = doc_ends[doc_ends >= 0]
            ending_with_eod = int(np.count_nonzero(data[doc_ends] == eod_id))
        del data
    elif eod_id is not None:
        ending_with_eod = 0
    return DatasetSummary(prefix=prefix, num_documents=len(doc_indices) - 1,
                          num_sequences=sequences, num_tokens=tokens, max_token_id=max_id,
                          documents_ending_with_eod=ending_with_eod)
