"""Corpus -> Megatron indexed dataset (``PREFIX_KEY_document.bin/.idx``), the engine behind
``tools/preprocess_data.py``.

Flags and output naming follow Megatron-LM's ``tools/preprocess_data.py`` so scripts written for
it run unchanged; the ``.bin/.idx`` pair is written by megatron-core's ``IndexedDatasetBuilder``
and read back by its ``IndexedDataset``.

Pipeline: the main process reads raw documents (bytes + file/line) in input order, groups them in
batches, and a process pool decodes, splits and tokenizes them; results come back *in order*, so
the output is byte-identical for any ``--workers``. ``--partitions P`` runs P such pipelines in
separate processes over contiguous document ranges and concatenates their outputs in order
(byte-identical to one partition). Outputs are written under temporary names and renamed only
after the ``.idx`` is complete; the old ``.idx`` is removed before the new ``.bin`` takes its
place, so a crash never leaves a ``.bin`` paired with an ``.idx`` that looks valid for it.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import multiprocessing
import os
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megatron_mosaic.data.corpus import (
    EMPTY_DOCUMENT,
    INVALID_TOKEN_ID,
    TOKENIZER_FAILURE,
    DataError,
    DocumentError,
    RawDocument,
    SkipSummary,
    add_corpus_args,
    decode_document,
    expand_inputs,
    incomplete_path,
    is_json_input,
    iter_raw_documents,
    iter_texts,
)
from megatron_mosaic.data.tokenizers import (
    InvalidTokenIdError,
    TokenizerError,
    TokenizerSpec,
    add_tokenizer_args,
    build_tokenizer,
)

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


def _init_worker(config: EncoderConfig) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(config)


def _worker_encode_batch(batch: list[RawDocument]) -> list[Union[EncodedDocument, DocumentError]]:
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


@dataclass
class PreprocessStats:
    documents: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    tokens: dict = field(default_factory=dict)
    skipped: SkipSummary = field(default_factory=SkipSummary)
    outputs: list = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class _Job:
    """One pipeline: a contiguous document range of the input into one set of prefixes."""

    encoder: EncoderConfig
    paths: tuple[str, ...]
    input_format: str
    txt_mode: str
    prefixes: tuple[tuple[str, str], ...]  # (json key, output prefix)
    workers: int
    skip_bad_lines: bool
    log_interval: int
    doc_range: Optional[tuple[int, int]] = None
    label: str = ""
    progress_total: Optional[int] = None


def _progress_bar(job: _Job, position: int):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs (the --log-interval lines remain).
    return tqdm(total=job.progress_total, unit="B", unit_scale=True, unit_divisor=1000,
                desc=job.label or "preprocess", position=position, file=sys.stderr,
                disable=None, mininterval=0.5, dynamic_ncols=True)


def _write_results(results: Iterable[list], writers: dict, job: _Job, bar) -> PreprocessStats:
    """Append encoded documents in order; stop at (or count) bad ones; log rates."""
    stats = PreprocessStats()
    start = time.perf_counter()
    for batch in results:
        for result in batch:
            if isinstance(result, DocumentError):
                if not job.skip_bad_lines:
                    raise DataError(f"{result} (pass --skip-bad-lines to skip such documents)")
                stats.skipped.add(result)
                continue
            for key, writer in writers.items():
                writer.add_document(result.ids[key], result.lengths[key])
            stats.documents += 1
            stats.input_bytes += result.nbytes
            bar.update(result.nbytes + 1)  # + its newline, so the bar meets the file size
            if stats.documents % job.log_interval == 0:
                elapsed = time.perf_counter() - start
                bar.write(f"{job.label}Processed {stats.documents} documents "
                          f"({stats.documents / elapsed:.1f} docs/s, "
                          f"{stats.input_bytes / 1e6 / elapsed:.2f} MB/s).", file=sys.stderr)
        rate = stats.documents / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{stats.documents} docs, {rate:.1f} docs/s", refresh=False)
    stats.seconds = time.perf_counter() - start
    return stats


def _run_job(job: _Job, position: int = 0) -> PreprocessStats:
    """Encode ``job.doc_range`` of the input into ``job.prefixes``; all or nothing."""
    raws = iter_raw_documents(job.paths, job.input_format, job.txt_mode)
    if job.doc_range is not None:
        raws = itertools.islice(raws, *job.doc_range)
    writers = {}
    pool = bar = None
    try:
        if job.workers > 1:
            # Fork the workers before anything (tqdm's monitor) starts a thread.
            pool = multiprocessing.Pool(job.workers, initializer=_init_worker, initargs=(job.encoder,))
            results = ordered_parallel_map(pool, _worker_encode_batch, batched(raws),
                                           window=WINDOW_PER_WORKER * job.workers)
        else:
            results = map(Encoder(job.encoder).encode_batch, batched(raws))
        for key, prefix in job.prefixes:
            writers[key] = AtomicIndexedWriter(prefix, np.dtype(job.encoder.dtype).type)
        bar = _progress_bar(job, position)
        stats = _write_results(results, writers, job, bar)
        if stats.documents == 0 and job.doc_range is None:
            raise DataError(f"{', '.join(job.paths)}: no usable documents, nothing written")
        start = time.perf_counter()
        for writer in writers.values():
            writer.commit()
        stats.seconds += time.perf_counter() - start
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.tokens = {key: w.tokens for key, w in writers.items()}
    stats.outputs = [prefix for _, prefix in job.prefixes]
    return stats


def _partition_main(job: _Job, position: int, queue) -> None:
    try:
        queue.put((position, "ok", _run_job(job, position)))
    except (DataError, TokenizerError) as err:
        queue.put((position, "error", str(err)))
    except BaseException:
        queue.put((position, "error", traceback.format_exc()))


def _collect(procs: list, queue) -> dict:
    """Each partition's (status, payload), read before joining (a child blocks until its
    result is read); a child that dies without reporting becomes an error, not a hang."""
    import queue as queue_module

    results: dict = {}
    while len(results) < len(procs):
        try:
            position, status, payload = queue.get(timeout=1.0)
            results[position] = (status, payload)
        except queue_module.Empty:
            for i, proc in enumerate(procs):
                if i not in results and not proc.is_alive() and queue.empty():
                    results[i] = ("error", f"partition {i} exited with code {proc.exitcode} without a result")
    for proc in procs:
        proc.join()
    return results


def _merge(parts: list[PreprocessStats], jobs: list[_Job], job: _Job) -> PreprocessStats:
    """Concatenate the partitions' datasets, in order, into the final prefixes."""
    stats = PreprocessStats()
    writers = {key: AtomicIndexedWriter(prefix, np.dtype(job.encoder.dtype).type) for key, prefix in job.prefixes}
    try:
        for part, part_job in zip(parts, jobs):
            stats.documents += part.documents
            stats.input_bytes += part.input_bytes
            stats.skipped.merge(part.skipped)
            for key, prefix in part_job.prefixes:
                writers[key].add_dataset(prefix)
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    stats.tokens = {key: w.tokens for key, w in writers.items()}
    return stats


def _run_partitions(job: _Job, partitions: int) -> PreprocessStats:
    """Split the documents into contiguous ranges, encode them concurrently, concatenate."""
    total = sum(1 for _ in iter_raw_documents(job.paths, job.input_format, job.txt_mode))
    bounds = [round(i * total / partitions) for i in range(partitions + 1)]
    pid = os.getpid()
    jobs = [
        _Job(job.encoder, job.paths, job.input_format, job.txt_mode,
             tuple((key, f"{prefix}.partition{i}-incomplete-{pid}") for key, prefix in job.prefixes),
             job.workers // partitions, job.skip_bad_lines, job.log_interval,
             doc_range=(bounds[i], bounds[i + 1]), label=f"[partition {i}] ")
        for i in range(partitions)
    ]
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_partition_main, args=(j, i, queue)) for i, j in enumerate(jobs)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    try:
        results = _collect(procs, queue)
        errors = [payload for _, (status, payload) in sorted(results.items()) if status != "ok"]
        if errors:
            raise DataError(errors[0])
        parts = [results[i][1] for i in range(partitions)]
        if not sum(part.documents for part in parts):
            raise DataError(f"{', '.join(job.paths)}: no usable documents, nothing written")
        stats = _merge(parts, jobs, job)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        # Partition outputs, and the temporary files of a partition that was interrupted.
        for part_job in jobs:
            for _, prefix in part_job.prefixes:
                for path in glob.glob(glob.escape(prefix) + ".bin*") + glob.glob(glob.escape(prefix) + ".idx*"):
                    os.remove(path)
    stats.seconds = time.perf_counter() - start
    stats.outputs = [prefix for _, prefix in job.prefixes]
    return stats


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/preprocess_data.py",
        description=(
            "Tokenize a corpus into Megatron's indexed binary format: one PREFIX_KEY_document.bin/"
            ".idx pair per --json-keys key (PREFIX_KEY_sentence with --split-sentences), readable "
            "by megatron.core.datasets.IndexedDataset. Flags follow Megatron-LM's "
            "tools/preprocess_data.py. Output is identical for any --workers / --partitions."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_tokenizer_args(parser)
    group = add_corpus_args(parser, json_keys_help="Keys to extract from each JSON line; one output dataset per "
                                                  "key. For .txt input, the single name used in the output prefix.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Split documents into sentences (one sequence per sentence) with NLTK "
                            "Punkt. NLTK's pre-trained punkt data is not downloaded: Punkt is trained "
                            "on the input itself (its first --punkt-train-chars characters, in input "
                            "order), which is deterministic, and the parameters are shared by all "
                            "workers.")
    group.add_argument("--punkt-train-chars", type=int, default=2_000_000,
                       help="Characters of input text Punkt is trained on (with --split-sentences).")
    group.add_argument("--keep-newlines", action="store_true",
                       help="With --split-sentences: keep the newlines (and other whitespace) between "
                            "sentences attached to the preceding sentence instead of dropping them.")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the tokenizer's end-of-document token to every document (needed "
                            "for document masking in training).")
    group.add_argument("--reject-empty-documents", action="store_true",
                       help="Stop at (or with --skip-bad-lines skip) a document with no "
                            "non-whitespace text or no tokens, instead of writing it as Megatron-LM "
                            "does (no tokens: a document of zero sequences; whitespace: its tokens "
                            "and EOD).")
    group.add_argument("--lang", type=str, default="english",
                       help="Accepted for Megatron-LM compatibility; Punkt is trained on the input, "
                            "so the input's language is what it learns.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Path prefix of the output files (its directory must exist).")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Worker processes that tokenize (with --partitions P, P x workers/P). "
                            "1 tokenizes in the main process.")
    group.add_argument("--partitions", type=int, default=1,
                       help="Split the documents into this many contiguous ranges processed by "
                            "separate processes, then concatenated in order.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print documents/s and MB/s every this many documents.")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="Accepted for Megatron-LM compatibility: document order is always kept.")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.vocab_size is not None and args.tokenizer_type != "NullTokenizer":
        # Other kinds read their vocabulary from their files: ignoring the flag would hide a mistake.
        raise DataError(f"--vocab-size applies to --tokenizer-type NullTokenizer only, not {args.tokenizer_type}")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers}: must be at least 1")
    if args.partitions < 1:
        raise DataError(f"--partitions {args.partitions}: must be at least 1")
    if args.workers % args.partitions:
        raise DataError(f"--workers {args.workers} must be a multiple of --partitions {args.partitions} "
                        "(each partition runs workers/partitions processes)")
    if args.log_interval < 1:
        raise DataError(f"--log-interval {args.log_interval}: must be at least 1")
    if args.punkt_train_chars < 1:
        raise DataError(f"--punkt-train-chars {args.punkt_train_chars}: must be at least 1")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise DataError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist")
    if os.path.basename(args.output_prefix) == "":
        raise DataError(f"--output-prefix {args.output_prefix}: needs a file name part, not only a directory")


def preprocess(args: argparse.Namespace, log: Callable[[str], None] = print) -> PreprocessStats:
    """Run the whole tool on parsed ``args``; raises DataError / TokenizerError on bad input."""
    _check_args(args)
    paths = expand_inputs(args.input)
    has_txt = not all(is_json_input(p, args.input_format) for p in paths)
    if has_txt and len(args.json_keys) != 1:
        raise DataError(f"--json-keys {' '.join(args.json_keys)}: text input has one text per document; give one name")
    # Workers are forked from this process: keep the Rust tokenizers' thread pool out of it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = build_tokenizer(args)
    from megatron.core.datasets.indexed_dataset import DType

    dtype = np.dtype(DType.optimal_dtype(tokenizer.vocab_size)).name
    punkt_params = None
    if args.split_sentences:
        from megatron_mosaic.data.sentences import train_punkt

        start = time.perf_counter()
        texts = iter_texts(paths, args.json_keys, args.input_format, args.txt_mode, skip=SkipSummary())
        punkt_params, used = train_punkt(texts, args.punkt_train_chars)
        log(f"Trained Punkt on {used} characters of the input in {time.perf_counter() - start:.1f} s")
    level = "sentence" if args.split_sentences else "document"
    encoder = EncoderConfig(TokenizerSpec.from_args(args), tuple(args.json_keys), args.append_eod,
                            dtype, punkt_params, args.keep_newlines, args.reject_empty_documents)
    prefixes = tuple((key, f"{args.output_prefix}_{key}_{level}") for key in args.json_keys)
    job = _Job(encoder, tuple(paths), args.input_format, args.txt_mode, prefixes, args.workers,
               args.skip_bad_lines, args.log_interval,
               progress_total=sum(os.path.getsize(p) for p in paths))
    log(f"Tokenizer: {tokenizer}; {len(paths)} input file(s); workers={args.workers}, partitions={args.partitions}")
    stats = _run_partitions(job, args.partitions) if args.partitions > 1 else _run_job(job)
    for key, prefix in prefixes:
        log(f"Wrote {prefix}.bin/.idx: {stats.documents} documents, {stats.tokens[key]} tokens ({dtype})")
    log(f"Processed {stats.documents} documents, {stats.input_bytes / 1e6:.2f} MB in {stats.seconds:.2f} s: "
        f"{stats.docs_per_s:.1f} docs/s, {stats.mb_per_s:.2f} MB/s")
    if stats.skipped.total:
        log(stats.skipped.report())
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        preprocess(args)
    except (DataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
