"""Pretrain Memory Mosaics (v1, v2) or the GPT baseline on Megatron-Core.

    torchrun --nproc_per_node=N pretrain_mosaic.py --model mosaic-v2 --data-path PREFIX \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model TOK.model ...

The same command runs on one CPU box (gloo) and on GPU nodes (nccl); see --help for all
arguments (named as in Megatron-LM) and README.md for a walk-through.
"""

import os
import sys
import warnings

# megatron-core announces at import time every optional accelerator it does not find
# (Apex, Transformer Engine); on a CPU box that is all of them, on every rank.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_mosaic.training.arguments import parse_args  # noqa: E402  (light: no torch)


def main() -> int:
    # Arguments first: --help and invalid combinations answer before torch/megatron load.
    args = parse_args(sys.argv[1:], int(os.environ.get("WORLD_SIZE", "1")))
    from megatron_mosaic.training.pretrain import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
