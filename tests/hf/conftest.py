"""Session fixtures: checkpoints from real TP=2 / PP=2 runs (one spawn) and their HF exports."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from tests.distributed import run_distributed
from tests.hf.helpers import train_tiny_sentencepiece
from tests.hf.parallel_checkpoints import SPECS, save_checkpoints


@dataclass
class ParallelCheckpoints:
    root: str
    logits: dict[str, torch.Tensor]
    tokenizer_model: str

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


@pytest.fixture(scope="session")
def parallel_checkpoints(tmp_path_factory) -> ParallelCheckpoints:
    root = str(tmp_path_factory.mktemp("parallel_checkpoints"))
    sp_model = train_tiny_sentencepiece(os.path.join(root, "spm"))
    extra = {"v2_tp2": {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": sp_model}}
    per_rank = run_distributed(save_checkpoints, 2, root, extra)
    logits: dict[str, torch.Tensor] = {}
    for result in per_rank:
        logits.update(result)
    assert set(logits) == set(SPECS)
    return ParallelCheckpoints(root=root, logits=logits, tokenizer_model=sp_model)


@pytest.fixture(scope="session")
def exported(parallel_checkpoints, tmp_path_factory) -> dict[str, str]:
    """Every checkpoint converted once (small shard limit: the sharded layout is exercised)."""
    from megatron_mosaic.hf.export import export_to_hf

    out_root = tmp_path_factory.mktemp("exported")
    dirs = {}
    for name in SPECS:
        target = str(out_root / f"hf_{name}")
        export_to_hf(parallel_checkpoints.path(name), target, max_shard_size="40KB")
        dirs[name] = target
    return dirs
