"""Print continuations of prompts from a megatron_mosaic checkpoint or an exported HF directory.

    python tools/generate.py --load CKPT_DIR|HF_DIR --prompt "Once upon a time" [--prompt ...]

Decoding runs through the Hugging Face model with its cache (Memory Mosaics: the lagged memory
cache, O(cache) work per token; the GPT baseline: Llama's KV cache). Greedy by default;
--temperature > 0 samples. Checkpoints trained without a tokenizer (NullTokenizer: the ids are
the text) take --prompt-ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_mosaic.hf.conversion import ConversionError  # noqa: E402
from megatron_mosaic.hf.generation import (  # noqa: E402
    generate_continuations,
    ids_only,
    load_for_generation,
    training_args,
)
from megatron_mosaic.hf.megatron_checkpoint import CheckpointError  # noqa: E402
from tools._cli import cli_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory or Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="prompt as space-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer to use instead of the stored one")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the summary line
    try:
        prompts = list(args.prompt) + [[int(t) for t in p.split()] for p in args.prompt_ids]
    except ValueError:
        return cli_error("generate", "--prompt-ids takes space-separated integers")
    if not prompts:
        return cli_error("generate", "give at least one --prompt or --prompt-ids")
    if args.temperature < 0 or args.top_k < 0 or args.max_new_tokens < 1:
        return cli_error("generate", "need --temperature >= 0, --top-k >= 0 and --max-new-tokens >= 1")
    try:
        if args.prompt and args.tokenizer_model is None and ids_only(training_args(args.load)):
            # Checked before the model is loaded: a NullTokenizer model has no text to encode.
            return cli_error("generate", f"--prompt {args.prompt[0][:40]!r}: {args.load} was trained with "
                                         "NullTokenizer (its text is token ids); give the prompt as --prompt-ids "
                                         "'ID ID ...'")
        model, tokenizer = load_for_generation(args.load, tokenizer_model=args.tokenizer_model)
        results = generate_continuations(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed, use_cache=not args.no_cache,
        )
    except (CheckpointError, ConversionError, FileNotFoundError, ValueError) as err:
        return cli_error("generate", err)
    for prompt, result in zip(prompts, results):
        shown = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        body = result.text if result.text is not None else " ".join(map(str, result.new_ids))
        rate = len(result.new_ids) / result.seconds if result.seconds > 0 else float("inf")
        print(f"=== {shown}")
        print(f"{shown if isinstance(prompt, str) else ''}{body}")
        print(f"--- {len(result.new_ids)} tokens, {rate:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "generate"))
