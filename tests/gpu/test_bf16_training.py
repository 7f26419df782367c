"""bf16 trains v2 as fp32 does: the same pretrain_mosaic.py run (tiny v2 on the in-context
mock data) with and without ``--bf16``, loss curves compared step by step.

``--bf16`` is Megatron-LM's: bf16 parameters (Float16Module), fp32 main parameters in the
optimizer and fp32 gradients. The projections and the SwiGLU run in bf16 while the scan, the
retrieval scores and the softmax stay fp32 (memory/precision.py). The tolerances come from
measuring this run on the CPU; without the fp32 regions the scores of large-β memories are
rounded in steps of 0.5 and the curves drift further apart.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import run_training

STEPS = 16
# Two layers and one micro-batch per step keep the two runs within CI's budget; a larger lr and
# clip make the short run learn visibly.
SMALL = ["--num-layers", "2", "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-2",
         "--min-lr", "1e-3", "--clip-grad", "1.0"]


def _curves(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    out = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        run = run_training("mosaic-v2", SMALL + ["--train-iters", str(STEPS), "--lr-decay-iters", str(STEPS)]
                           + extra, world_size)
        out[name] = run["losses"]
        parallel_state.destroy_model_parallel()
    return out


def test_bf16_training_follows_fp32():
    curves = run_distributed(_curves, 1)[0]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    if os.environ.get("MOSAIC_PRINT_CURVES"):
        print("\nfp32", " ".join(f"{x:.3f}" for x in fp32), "\nbf16", " ".join(f"{x:.3f}" for x in bf16))
    assert len(fp32) == len(bf16) == STEPS
    worst = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    tail = sum(bf16[-5:]) / 5 - sum(fp32[-5:]) / 5
    learned = sum(fp32[:3]) / 3 - sum(fp32[-5:]) / 5
    assert learned > 0.3, f"the fp32 run must learn for the comparison to mean anything ({learned:.3f} nats)"
    # Measured on the CPU with bf16 parameters: the largest per-step gap 2.3% (step 16), the last
    # 5 losses +0.012 nats from fp32's on average (bf16 autocast over fp32 weights, before:
    # 0.5% and 0.002). The bounds leave 2-3x room for other CPUs' and GPUs' bf16 GEMMs.
    assert worst < 0.06, f"a bf16 step's loss is {worst:.2%} away from fp32's"
    assert abs(tail) < 0.04, f"the last 5 bf16 losses average {tail:+.4f} nats from fp32's"


def _recompute(rank: int, world_size: int, model: str) -> dict:
    from megatron.core import parallel_state

    out = {}
    full = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    for name, extra in (("plain", []), ("full", full)):
        run = run_training(model, SMALL + ["--train-iters", "3", "--bf16"] + extra, world_size)
        out[name] = (run["losses"], run["params"])
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("model", ["mosaic-v2", "gpt"])
def test_bf16_full_recompute_changes_nothing(model):
    """Full recomputation gives the same losses and weights, bit for bit. Megatron's recompute
    does not replay the forward's autocast, but with bf16 weights the layers compute in bf16
    either way (the fp32 regions upcast explicitly): measured equal with and without replay."""
    r = run_distributed(_recompute, 1, model)[0]
    (plain_losses, plain), (full_losses, full) = r["plain"], r["full"]
    assert full_losses == plain_losses, (full_losses, plain_losses)
    for name, want in plain.items():
        assert torch.equal(full[name], want), name

