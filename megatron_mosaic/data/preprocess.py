"""Corpus -> Megatron indexed dataset (``PREFIX_KEY_document.bin/.idx``), the engine behind
``tools/preprocess_data.py``: its command line, the checks of its arguments and the run.

Flags and output naming follow Megatron-LM's ``tools/preprocess_data.py`` so scripts written for
it run unchanged. The work is done by ``encoder`` (raw documents -> token ids, in order, on a
worker pool), ``indexed_writer`` (the ``.bin/.idx`` pair, replaced atomically) and
``preprocess_jobs`` (one pipeline, or ``--partitions`` of them concatenated in order).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_mosaic.data.corpus import (
    DataError,
    SkipSummary,
    add_corpus_args,
    expand_inputs,
    is_json_input,
    iter_texts,
)
from megatron_mosaic.data.encoder import EncoderConfig
from megatron_mosaic.data.indexed_writer import AtomicIndexedWriter  # noqa: F401  (imported from here)
from megatron_mosaic.data.preprocess_jobs import Job, PreprocessStats, run_job, run_partitions
from megatron_mosaic.data.tokenizers import TokenizerError, TokenizerSpec, add_tokenizer_args, build_tokenizer


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
    job = Job(encoder, tuple(paths), args.input_format, args.txt_mode, prefixes, args.workers,
               args.skip_bad_lines, args.log_interval,
               progress_total=sum(os.path.getsize(p) for p in paths))
    log(f"Tokenizer: {tokenizer}; {len(paths)} input file(s); workers={args.workers}, partitions={args.partitions}")
    stats = run_partitions(job, args.partitions) if args.partitions > 1 else run_job(job)
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
