#!/usr/bin/env python
"""Score a checkpoint on an in-context task at one or more lengths (forward passes only).

    python tools/evaluate.py --load CKPT_DIR|HF_DIR --task recall fewshot --seq-length 256 1024 2048 \
        --num-docs 32 --output runs/eval/v2

Works for Megatron checkpoints of every --model (mosaic-v1, mosaic-v2, gpt), saved at any
TP/PP/CP layout, and for exported Hugging Face directories. Each answer is scored by argmax
(exact match of its tokens) and log-likelihood; the per-position loss is recorded at every
length. Lengths beyond the training length are scored, never refused: that degradation is
what the table shows (Memory Mosaics have no positional encoding; the GPT baseline has RoPE).

Documents are generated with the checkpoint's own vocabulary: NullTokenizer (or mock-data)
checkpoints get integer ids, others get words through their tokenizer (lengths then
approximate, never above the requested length). On one process the Hugging Face model scores
(a checkpoint of any layout is merged in memory). Long contexts run under context parallelism:

    torchrun --nproc_per_node=2 tools/evaluate.py --load CKPT_DIR --task recall --seq-length 8192

runs the Megatron model's own CP path with the sequence split over 2 ranks (CP defaults to the
number of processes; --context-parallel-size says it explicitly). Rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from tools._cli import cli_error  # noqa: E402

PROG = "evaluate"


def build_parser() -> argparse.ArgumentParser:
    from megatron_mosaic.evaluation.synthetic import QUERY_ORDERS
    from megatron_mosaic.evaluation.tasks import TASKS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory or Hugging Face model directory")
    p.add_argument("--task", required=True, nargs="+", choices=list(TASKS),
                   help="one or more tasks (the model is loaded once)")
    p.add_argument("--seq-length", type=int, nargs="+", required=True, help="evaluation lengths in tokens")
    p.add_argument("--num-docs", type=int, default=16, help="documents per length")
    p.add_argument("--seed", type=int, default=4321, help="keep it apart from the training data's seed")
    p.add_argument("--text", nargs="+", default=None, help="real-text corpus for multidoc and lm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--name", default=None, help="model name in tables and plots (default: the --model)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer vocabulary, for an HF directory exported without megatron_args.json")
    p.add_argument("--num-symbols", type=int, default=None,
                   help="key/value symbols per set: the number the training data was made with "
                        "(tools/make_eval_data.py --num-symbols; default the same default)")
    p.add_argument("--num-pairs", type=int, default=None,
                   help="recall: key-value pairs per document, the number the training data was made with "
                        "(tools/make_eval_data.py --num-pairs; default the same default, a quarter of the length)")
    p.add_argument("--query-order", choices=QUERY_ORDERS, default="rounds",
                   help="recall: the query order the training data was made with (tools/make_eval_data.py "
                        "--query-order; default rounds)")
    p.add_argument("--output", default=None, help="directory for TASK.json, TASK.csv and the plots, per task")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--context-parallel-size", type=int, default=None,
                   help="split each sequence over this many ranks (Megatron checkpoints; one process per rank "
                        "under torchrun; default: the number of processes)")
    return p


def check(args: argparse.Namespace) -> Optional[str]:
    from megatron_mosaic.evaluation.tasks import TASKS

    if any(length < 8 for length in args.seq_length):
        return f"--seq-length values must be >= 8, got {args.seq_length}"
    if args.num_pairs is not None and (args.num_pairs < 1 or "recall" not in args.task):
        return f"--num-pairs is recall's and must be >= 1, got {args.num_pairs} for --task {' '.join(args.task)}"
    if args.query_order != "rounds" and "recall" not in args.task:
        return f"--query-order is recall's, got it for --task {' '.join(args.task)}"
    if args.num_docs < 1 or args.batch_size < 1:
        return "--num-docs and --batch-size must be >= 1"
    if any(TASKS[t].needs_text for t in args.task) and not args.text:
        return f"--task {' '.join(t for t in args.task if TASKS[t].needs_text)} needs real text: pass --text CORPUS.jsonl"
    if not os.path.isdir(args.load):
        return f"--load {args.load}: no such directory"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.context_parallel_size = args.context_parallel_size or world
    if cp < 1 or cp != world:
        return (f"--context-parallel-size {cp} needs exactly {cp} processes "
                f"(torchrun --nproc_per_node={cp}), got {world}")
    if cp > 1 and os.path.isfile(os.path.join(args.load, "config.json")):
        return (f"--load {args.load} is a Hugging Face directory: context parallelism runs the Megatron model, "
                "so it needs the Megatron checkpoint")
    return None


def _fail(message: object) -> int:
    """One line from the first rank; the others wait so torchrun does not stop rank 0 first."""
    from megatron_mosaic.training.arguments import FIRST_RANK_GRACE_S, is_first_rank

    if is_first_rank():
        return cli_error(PROG, message)
    import time

    time.sleep(FIRST_RANK_GRACE_S)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check(args)
    if problem:
        return _fail(problem)
    from megatron_mosaic.evaluation.synthetic import recall_options

    # Recall's generator options, defaults left out: a default run generates what it always did.
    recall = recall_options(args.num_pairs, args.query_order)
    import torch
    from transformers.utils import logging as hf_logging

    from megatron_mosaic.data.corpus import DataError
    from megatron_mosaic.evaluation import VocabError
    from megatron_mosaic.evaluation.model_runner import load_model
    from megatron_mosaic.evaluation.report import table, write_outputs
    from megatron_mosaic.evaluation.run import evaluate_task
    from megatron_mosaic.hf.conversion import ConversionError
    from megatron_mosaic.hf.megatron_checkpoint import CheckpointError

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = os.environ.get("RANK", "0") == "0"
    log = lambda message: first and print(message, file=sys.stderr, flush=True)  # noqa: E731
    cp = args.context_parallel_size
    try:
        if cp > 1:
            from megatron_mosaic.evaluation.cp_runner import init_context_parallel, load_megatron_for_cp

            init_context_parallel(cp)
            loaded = load_megatron_for_cp(args.load, args.vocab_size, args.num_symbols)
        else:
            loaded = load_model(args.load, args.vocab_size, args.num_symbols)
        log(f"loaded {loaded.kind} from {args.load}: {loaded.parameters:,} parameters, "
            f"training length {loaded.train_seq_length}, {loaded.vocab.fmt} format"
            + (f", context parallel over {cp} ranks" if cp > 1 else ""))
        for task in dict.fromkeys(args.task):
            options = recall if task == "recall" else {}
            results = evaluate_task(loaded, task, args.seq_length, num_docs=args.num_docs, seed=args.seed,
                                    text=args.text, batch_size=args.batch_size,
                                    name=args.name or loaded.kind, log=log, options=options)
            if cp > 1:
                results["context_parallel_size"] = cp
            results.update(options)  # the JSON says which documents were scored
            if not first:
                continue
            print(table([results]), flush=True)
            for path in write_outputs([results], args.output, task) if args.output else []:
                print(f"wrote {path}")
    except (CheckpointError, ConversionError, VocabError, DataError, FileNotFoundError, ValueError) as err:
        return _fail(err)
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    status = run_tool(main, "evaluate")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a context-parallel run: leave cleanly
        dist.destroy_process_group()
    sys.exit(status)
