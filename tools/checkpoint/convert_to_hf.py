"""Convert a megatron_mosaic checkpoint (any TP/PP/CP layout) into a Hugging Face model directory.

    python tools/checkpoint/convert_to_hf.py --load CKPT_DIR --output HF_DIR [--max-shard-size 5GB]

Memory Mosaics v1/v2 become ``MemoryMosaicForCausalLM`` (remote code shipped in HF_DIR: load with
``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``); the GPT baseline becomes
a standard ``LlamaForCausalLM``. HF_DIR gets config.json (with auto_map), model.safetensors
(sharded with an index above --max-shard-size), generation_config.json, the tokenizer when the
checkpoint names one (none for NullTokenizer: the ids are the text), and megatron_args.json (the
run's arguments, used by convert_from_hf.py).
The directory is staged and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron_mosaic.hf.conversion import ConversionError  # noqa: E402
from megatron_mosaic.hf.export import export_to_hf  # noqa: E402
from megatron_mosaic.hf.megatron_checkpoint import CheckpointError  # noqa: E402
from tools._cli import cli_error  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt) "
                                                 "or one iter_NNNNNNN directory")
    p.add_argument("--output", required=True, help="Hugging Face directory to create")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit, e.g. 2GB or 500MB")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="store weights in this dtype (default: as in the checkpoint, fp32)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer file/directory to use instead of the path stored in the checkpoint")
    p.add_argument("--no-tokenizer", action="store_true", help="do not export a tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the summary line
    try:
        summary = export_to_hf(
            args.load, args.output, max_shard_size=args.max_shard_size,
            dtype=DTYPES[args.dtype] if args.dtype else None, tokenizer=not args.no_tokenizer,
            tokenizer_model=args.tokenizer_model, overwrite=args.overwrite,
        )
    except (CheckpointError, ConversionError, FileExistsError, FileNotFoundError) as err:
        return cli_error("convert_to_hf", err)
    print(f"converted {summary['model']} iteration {summary['iteration']} "
          f"({summary['parameters']:,} parameters, tokenizer: {summary['tokenizer'] or 'none'}) -> {summary['output']}")
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "convert_to_hf"))
