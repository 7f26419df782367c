"""Writes the old-layout checkpoints of test_old_checkpoints.py (run once, with the code of
commit 5346638, before each memory's projections were fused into one GEMM):

    python -m tests.model.old_layout.make_fixture tests/model/old_layout

For v1 and v2: a 1-layer model (d=16, 2 heads) with perturbed weights saved by the training
code (model only), and its logits on fixed tokens (``logits.pt``). Kept as written: the test
proves that a checkpoint of the separate key/value/gate/decay projections still loads.
"""

from __future__ import annotations

import os
import sys

import torch

MODELS = ("mosaic-v1", "mosaic-v2")
SEQ, EOD = 12, 3


def run_args(model: str):
    from megatron_mosaic.training.arguments import parse_args

    argv = ["--model", model, "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", str(SEQ), "--mock-data", "--vocab-size", "30", "--short-term-window", "4",
            "--long-term-inference-delay", "3", "--persistent-memory-size", "8", "--ffn-hidden-size", "24"]
    args = parse_args(argv, world_size=1)
    args.padded_vocab_size = 32
    args.eod_token_id = EOD
    return args


def tokens() -> torch.Tensor:
    ids = torch.randint(4, 30, (2, SEQ), generator=torch.Generator().manual_seed(5))
    ids[0, 5] = EOD
    return ids


def main(root: str) -> None:
    from megatron_mosaic.training.arguments import args_to_dict
    from megatron_mosaic.training.checkpointing import save_checkpoint
    from megatron_mosaic.training.initialize import single_rank_megatron
    from megatron_mosaic.training.model_builder import build_model

    logits = {}
    for index, model in enumerate(MODELS):
        with single_rank_megatron(seed=7):
            args = run_args(model)
            chunks = build_model(args)
            gen = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for _, p in chunks[0].named_parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
            chunks[0].eval()
            save_checkpoint(os.path.join(root, model), 1, chunks, args=args_to_dict(args), save_rng=False)
            with torch.no_grad():
                logits[model] = chunks[0](tokens())
    torch.save(logits, os.path.join(root, "logits.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
