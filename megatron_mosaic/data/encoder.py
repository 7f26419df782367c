"""Raw documents -> token ids for ``tools/preprocess_data.py``: the per-document ``Encoder`` and
the ordered worker pool that runs it.

The main process reads raw documents (bytes + file/line) in input order and groups them in
batches; the encoder decodes, splits and tokenizes them in the main process or in a pool of
workers. Results come back *in input order*, so the output is byte-identical for any
``--workers``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from megatron_mosaic.data.corpus import (
    EMPTY_DOCUMENT,
    INVALID_TOKEN_ID,
    TOKENIZER_FAILURE,
    DocumentError,
    RawDocument,
    decode_document,
)
from megatron_mosaic.data.tokenizers import InvalidTokenIdError, TokenizerSpec, build_tokenizer

# Batches handed to a worker: large enough to amortise IPC, small enough to balance a few long
# documents (a Shakespeare play is ~130 KB) over the workers.
BATCH_MAX_BYTES = 256 * 1024
BATCH_MAX_DOCS = 512
# Batches in flight per worker. Pool.imap would read the whole input ahead of the workers;
# a bounded window keeps memory flat on corpora larger than RAM with the same ordered output.
WINDOW_PER_WORKER = 4


@dataclass(frozen=True)
class EncoderConfig:
    """What a worker needs to turn raw documents into token ids (picklable)."""

    tokenizer: TokenizerSpec
    json_keys: tuple[str, ...]
    append_eod: bool
    dtype: str
    punkt_params: object = None  # nltk PunktParameters when splitting sentences
    keep_newlines: bool = False
    reject_empty: bool = False  # --reject-empty-documents


@dataclass
class EncodedDocument:
    """Token ids per key (concatenated sentences) with the length of each sentence."""

    ids: dict[str, np.ndarray]
    lengths: dict[str, list[int]]
    nbytes: int


class Encoder:
    """Decode, split and tokenize one raw document (one instance per worker process)."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.splitter = None
        if config.punkt_params is not None:
            from megatron_mosaic.data.sentences import SentenceSplitter

            self.splitter = SentenceSplitter(config.punkt_params, config.keep_newlines)

    def encode(self, raw: RawDocument) -> EncodedDocument:
        values = decode_document(raw, self.config.json_keys, allow_empty=not self.config.reject_empty)
        ids, lengths = {}, {}
        for key in self.config.json_keys:
            value = values[key]
            if isinstance(value, list):  # already split into sentences upstream
                sentences = value
            elif self.splitter is not None:
                sentences = self.splitter.split(value)
            else:
                sentences = [value]
            doc, lens = [], []
            for sentence in sentences:
                try:
                    sentence_ids = self.tokenizer.tokenize(sentence)
                except InvalidTokenIdError as err:
                    where = _token_location(raw, err.offset) if sentence is value else raw.where
                    raise DocumentError(INVALID_TOKEN_ID, where, f"key {key!r}: {err}") from None
                except Exception as err:  # e.g. lone surrogates from a JSON escape
                    raise DocumentError(TOKENIZER_FAILURE, raw.where, f"key {key!r}: {err}") from None
                if sentence_ids:
                    doc.extend(sentence_ids)
                    lens.append(len(sentence_ids))
            if not doc and self.config.reject_empty:
                raise DocumentError(EMPTY_DOCUMENT, raw.where, f"key {key!r} has no tokens")
            # As Megatron-LM: a document that tokenizes to nothing is written as a document of
            # zero sequences, without EOD; whitespace the tokenizer keeps gets its tokens + EOD.
            if doc and self.config.append_eod:
                doc.append(self.tokenizer.eod)
                lens[-1] += 1
            ids[key] = np.asarray(doc, dtype=self.config.dtype)
            lengths[key] = lens
        return EncodedDocument(ids, lengths, len(raw.data))

    def encode_batch(self, batch: list[RawDocument]) -> list[Union[EncodedDocument, DocumentError]]:
        out = []
        for raw in batch:
            try:
                out.append(self.encode(raw))
            except DocumentError as err:
                out.append(err)
        return out


def _token_location(raw: RawDocument, offset: int) -> str:
    """``file:line`` of the character at ``offset`` of a whole document's text.

    A text document is its raw bytes decoded unchanged, so counting newlines before the offset
    gives the exact line in a multi-line .txt document; a JSON document is one line.
    """
    if raw.is_json:
        return raw.where
    text = raw.data.decode("utf-8")  # already decoded once without error by decode_document
    return f"{raw.path}:{raw.line + text.count(chr(10), 0, offset)}"


_WORKER_ENCODER: Optional[Encoder] = None


def init_worker(config: EncoderConfig) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(config)


def worker_encode_batch(batch: list[RawDocument]) -> list[Union[EncodedDocument, DocumentError]]:
    return _WORKER_ENCODER.encode_batch(batch)


def batched(raws: Iterable[RawDocument], max_bytes: Optional[int] = None,
            max_docs: Optional[int] = None) -> Iterator[list[RawDocument]]:
    """Consecutive documents grouped up to ``max_bytes`` / ``max_docs`` (module defaults)."""
    max_bytes = max_bytes or BATCH_MAX_BYTES
    max_docs = max_docs or BATCH_MAX_DOCS
    batch, size = [], 0
    for raw in raws:
        batch.append(raw)
        size += len(raw.data)
        if size >= max_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordered_parallel_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.imap(fn, items)`` with at most ``window`` items read ahead of the consumer."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

