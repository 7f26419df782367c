"""Convert a Hugging Face model directory back into a megatron_mosaic checkpoint.

    python tools/checkpoint/convert_from_hf.py --load HF_DIR --save CKPT_DIR [--iteration N]

Accepts what convert_to_hf.py writes (``model_type`` memory_mosaic or llama). The checkpoint is
written through the training code at TP=PP=1; distributed checkpointing stores global tensors, so
``pretrain_mosaic.py --load CKPT_DIR`` continues from it under any TP/PP layout (the optimizer
starts fresh). Run arguments come from HF_DIR/megatron_args.json when present, architecture
fields always from config.json. Megatron -> HF -> Megatron reproduces every tensor exactly (fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_mosaic.hf.conversion import ConversionError  # noqa: E402
from megatron_mosaic.hf.importer import import_from_hf  # noqa: E402
from tools._cli import cli_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="Hugging Face model directory")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--iteration", type=int, default=None,
                   help="iteration to record (default: the exported one, 0 for a foreign model)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the summary line
    if args.iteration is not None and args.iteration < 0:
        return cli_error("convert_from_hf", "--iteration must be >= 0")
    try:
        summary = import_from_hf(args.load, args.save, iteration=args.iteration, overwrite=args.overwrite)
    except (ConversionError, FileExistsError, FileNotFoundError) as err:
        return cli_error("convert_from_hf", err)
    print(f"converted {summary['model']} ({summary['parameters']:,} parameters) -> {summary['output']} "
          f"at iteration {summary['iteration']}")
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "convert_from_hf"))
