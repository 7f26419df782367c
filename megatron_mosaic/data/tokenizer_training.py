"""Train a SentencePiece tokenizer from the same inputs ``tools/preprocess_data.py`` reads.

The model is trained for exact round trips on raw text, which a language model sampling plain
text needs: identity normalisation (no NFKC, no whitespace collapsing), ``\\n`` as a single
piece, byte fallback for any character outside the vocabulary, and whitespace-only pieces
allowed (indentation). Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the EOD), no pad.
Documents are cut at line ends into chunks of at most ``max_chunk_chars`` characters, since
SentencePiece drops training "sentences" longer than ``max_sentence_length``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

from megatron_mosaic.data.corpus import (
    DataError,
    SkipSummary,
    add_corpus_args,
    expand_inputs,
    iter_texts,
    replaced_when_written,
)

MODEL_TYPES = ("bpe", "unigram")


def chunk_text(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of ``text`` of at most ``max_chars`` characters, cut after a newline when possible."""
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut >= start:
                end = cut + 1
        yield text[start:end]
        start = end


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    num_threads: int = 1,
    input_sentence_size: int = 0,
    max_chunk_chars: int = 16384,
) -> str:
    """Train and write ``model_prefix.model`` and ``model_prefix.vocab``; returns the model path."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    chunks = _Guarded(chunk for text in texts for chunk in chunk_text(text, max_chunk_chars))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks, model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
            split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=4 * max_chunk_chars, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0, num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as err:
        chunks.reraise()
        raise DataError(f"--vocab-size {vocab_size} / --model-type {model_type}: SentencePiece training failed: {err}") from None
    chunks.reraise()
    if not model.getvalue():
        raise DataError("SentencePiece training produced no model (is the input empty?)")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    model_path, vocab_path = model_prefix + ".model", model_prefix + ".vocab"
    _write_atomic(model_path, model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    _write_atomic(vocab_path, vocab.encode("utf-8"))
    return model_path


class _Guarded:
    """An iterator that ends (instead of raising) on an error, kept for ``reraise``: an
    exception raised inside SentencePiece's C++ trainer loop would lose its message."""

    def __init__(self, it: Iterable[str]) -> None:
        self._it = iter(it)
        self._error: Optional[BaseException] = None

    def __iter__(self) -> "_Guarded":
        return self

    def __next__(self) -> str:
        if self._error is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as err:
            self._error = err
            raise StopIteration from None

    def reraise(self) -> None:
        if self._error is not None:
            raise self._error


def _write_atomic(path: str, data: bytes) -> None:
    with replaced_when_written(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/train_tokenizer.py",
        description=(
            "Train a SentencePiece tokenizer (BPE or unigram) on a raw corpus, read exactly as "
            "tools/preprocess_data.py reads it. The model round-trips raw text exactly (identity "
            "normalisation, newline piece, byte fallback); its EOS (id 2) is the EOD token. Use it "
            "with --tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_corpus_args(parser, json_keys_help="Keys holding text in JSON lines.")
    parser.add_argument("--model-prefix", "--output-prefix", dest="model_prefix", required=True,
                        help="Writes PREFIX.model and PREFIX.vocab (the directory must exist).")
    parser.add_argument("--vocab-size", type=int, default=8000, help="Number of pieces.")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="Share of characters covered by pieces; the rest falls back to bytes.")
    parser.add_argument("--num-threads", type=int, default=1, help="SentencePiece trainer threads.")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="Train on a random sample of this many chunks (0: all of them).")
    parser.add_argument("--max-chunk-chars", type=int, default=16384,
                        help="Documents are cut at line ends into chunks of at most this many characters.")
    return parser


def run(args: argparse.Namespace, log=print) -> str:
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    if not os.path.isdir(out_dir):
        raise DataError(f"--model-prefix {args.model_prefix}: directory {out_dir} does not exist")
    if args.vocab_size < 1:
        raise DataError(f"--vocab-size {args.vocab_size}: must be positive")
    paths = expand_inputs(args.input)
    skip = SkipSummary() if args.skip_bad_lines else None
    start = time.perf_counter()
    model_path = train_sentencepiece(
        iter_texts(paths, args.json_keys, args.input_format, args.txt_mode, skip),
        args.model_prefix, args.vocab_size, args.model_type, args.character_coverage,
        args.num_threads, args.input_sentence_size, args.max_chunk_chars,
    )
    log(f"Wrote {model_path} and {args.model_prefix}.vocab ({args.model_type}, vocab {args.vocab_size}) "
        f"in {time.perf_counter() - start:.1f} s; use --tokenizer-type SentencePieceTokenizer "
        f"--tokenizer-model {model_path}")
    if skip is not None and skip.total:
        log(skip.report())
    return model_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
