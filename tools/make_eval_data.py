#!/usr/bin/env python
"""Write seeded in-context evaluation/training documents as JSON lines.

    python tools/make_eval_data.py recall --output data/icl/recall.jsonl --seed 1 \
        --num-docs 2000 --length 256 --vocab-size 2048

Tasks: recall, fewshot, multidoc (needs --text), lm (needs --text). The ``ids`` format (default)
writes whitespace-separated integer ids for ``--tokenizer-type NullTokenizer --vocab-size N``;
``--format text`` writes words for any other tokenizer. Every line holds ``text`` (what
tools/preprocess_data.py reads) and ``segments`` with the answer spans tools/evaluate.py scores.

``--lm-eval`` writes lm-evaluation-harness rows instead (context, answer, choices: the data of
megatron_mosaic/evaluation/lm_eval_tasks/), and ``--ids-tokenizer DIR`` writes NullTokenizer
as a transformers tokenizer for ``lm_eval --model_args pretrained=EXPORT,tokenizer=DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_mosaic.data.corpus import DataError  # noqa: E402
from megatron_mosaic.evaluation import TASKS, SymbolVocab, TextSource, VocabError, generate_documents  # noqa: E402
from megatron_mosaic.evaluation.documents import write_documents  # noqa: E402
from megatron_mosaic.evaluation.lm_eval_data import lm_eval_rows, write_ids_tokenizer  # noqa: E402
from megatron_mosaic.evaluation.synthetic import QUERY_ORDERS, recall_options  # noqa: E402
from tools._cli import cli_error  # noqa: E402

PROG = "make_eval_data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("task", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--output", required=True, help="JSON-lines file to write")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-docs", type=int, default=1000)
    p.add_argument("--length", type=int, default=256, help="units per document (tokens in the ids format)")
    p.add_argument("--format", choices=("ids", "text"), default="ids")
    p.add_argument("--vocab-size", type=int, default=None, help="ids format: NullTokenizer's --vocab-size")
    p.add_argument("--num-symbols", type=int, default=None,
                   help="key and value symbols per set (default: text 64; ids a quarter of the non-reserved "
                        "ids, at most 256); evaluation must be given the same number")
    p.add_argument("--num-pairs", type=int, default=None,
                   help="recall: key-value pairs per document (default a quarter of --length, at most "
                        "--num-symbols); the rest of the document is queries")
    p.add_argument("--query-order", choices=QUERY_ORDERS, default="rounds",
                   help="recall: rounds (default) walks random permutations of the keys; random draws each "
                        "query's key uniformly, with repeats (no least-recently-seen shortcut)")
    p.add_argument("--text", nargs="+", default=None, help="real-text corpus for multidoc and lm (jsonl/txt)")
    p.add_argument("--lm-eval", action="store_true",
                   help="write lm-evaluation-harness rows (each document's last answer) instead of documents")
    p.add_argument("--ids-tokenizer", default=None, metavar="DIR",
                   help="ids format: also write NullTokenizer (--vocab-size) as a transformers tokenizer to DIR")
    return p


def progress(count: int, total: int, start: float) -> None:
    if count == total or count % max(1, total // 10) == 0:
        rate = count / max(time.perf_counter() - start, 1e-9)
        print(f"  {count}/{total} documents ({rate:,.0f}/s)", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.task not in TASKS:
            raise VocabError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
        if args.num_pairs is not None and args.task != "recall":
            raise VocabError(f"--num-pairs is recall's, not {args.task}'s")
        if args.query_order != "rounds" and args.task != "recall":
            raise VocabError(f"--query-order is recall's, not {args.task}'s")
        vocab = SymbolVocab(args.format, args.vocab_size, args.num_symbols)
        options = recall_options(args.num_pairs, args.query_order)
        if options:  # a bad value fails here, before the output file is opened
            next(generate_documents(args.task, vocab, args.length, 1, args.seed, **options))
        source = TextSource(args.text, vocab) if args.text and TASKS[args.task].needs_text else None
        start = time.perf_counter()

        def counted():
            for i, doc in enumerate(generate_documents(args.task, vocab, args.length, args.num_docs,
                                                       args.seed, source, **options), 1):
                yield doc
                progress(i, args.num_docs, start)

        if args.ids_tokenizer and args.format != "ids":
            raise VocabError("--ids-tokenizer is NullTokenizer's: it needs the ids format")
        if args.lm_eval and args.task not in ("recall", "fewshot"):
            raise VocabError(f"--lm-eval writes rows for recall and fewshot (the tasks of lm_eval_tasks/), not {args.task}")
        count = write_documents(args.output, lm_eval_rows(counted()) if args.lm_eval else counted())
        if args.ids_tokenizer:
            print(f"wrote NullTokenizer ({args.vocab_size} ids + EOD) to {write_ids_tokenizer(args.vocab_size, args.ids_tokenizer)}")
    except (VocabError, DataError, OSError) as err:
        return cli_error(PROG, err)
    print(f"wrote {count} {args.task} {'lm-eval rows' if args.lm_eval else 'documents'} of {args.length} units to {args.output} "
          f"(format {args.format}, {vocab.num_symbols} symbols per set"
          + (f", {args.num_pairs} pairs per document" if args.num_pairs is not None else "")
          + (f", {args.query_order} query order)" if args.query_order != "rounds" else ")"))
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "make_eval_data"))
