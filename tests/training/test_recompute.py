"""Activation recomputation changes memory, never results.

``--recompute-granularity full`` (uniform and block) and ``selective`` train the same losses and
leave the same gradients and weights as the run without recomputation, at TP=2 and PP=2 (fp32,
1e-6 relative). Recomputation replays the same float operations, so any difference means the
recomputed forward saw other inputs (a lost MemoryContext, a different RNG or autocast state).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import tiny_args

TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
FULL_UNIFORM = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]
FULL_BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]
SELECTIVE = ["--recompute-granularity", "selective"]
# (layout, model, recompute flags); dropout on so the recomputation must replay the RNG.
CASES = {
    "tp2": [("mosaic-v2", FULL_UNIFORM), ("mosaic-v2", SELECTIVE), ("mosaic-v1", SELECTIVE), ("gpt", FULL_BLOCK)],
    "pp2": [("mosaic-v2", FULL_BLOCK), ("mosaic-v1", FULL_UNIFORM), ("gpt", SELECTIVE)],
}
STEPS = ["--train-iters", "2", "--hidden-dropout", "0.1"]


def _train(model: str, extra: list[str], world_size: int) -> dict:
    """Train 2 steps; the losses, final weights and last step's (clipped) main gradients."""
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    args = tiny_args(model, STEPS + extra, world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()
    params, grads = {}, {}
    for i, chunk in enumerate(run.model):
        for name, param in chunk.named_parameters():
            params[f"{i}.{name}"] = param.detach().clone()
            grads[f"{i}.{name}"] = param.main_grad.detach().clone()
    return {"losses": run.losses, "params": params, "grads": grads}


def _compare(rank: int, world_size: int, layout: str) -> list[tuple]:
    extra = TP2 if layout == "tp2" else PP2
    out = []
    for model, recompute in CASES[layout]:
        out.append((model, recompute, _train(model, extra, world_size), _train(model, extra + recompute, world_size)))
    return out


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(float(b.abs().max()), 1e-12)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", list(CASES))
def test_recompute_matches_no_recompute(layout):
    for rank, results in enumerate(run_distributed(_compare, 2, layout)):
        for model, recompute, plain, recomputed in results:
            what = f"{layout} rank {rank} {model} {' '.join(recompute)}"
            assert len(plain["losses"]) == 2
            for a, b in zip(recomputed["losses"], plain["losses"]):
                assert abs(a - b) <= 1e-6 * abs(b), f"{what}: loss {a} != {b}"
            assert recomputed["grads"].keys() == plain["grads"].keys()
            assert sum(g.abs().sum() for g in plain["grads"].values()) > 0, f"{what}: no gradients"
            for name in plain["grads"]:
                _assert_same(recomputed["grads"][name], plain["grads"][name], f"{what} grad {name}")
                _assert_same(recomputed["params"][name], plain["params"][name], f"{what} weight {name}")


def test_recompute_arguments_are_checked():
    from megatron_mosaic.training.arguments import ArgumentError, build_parser, validate_args
    from tests.training.common import TINY

    def validate(extra):
        return validate_args(build_parser().parse_args(TINY + ["--model", "mosaic-v2"] + extra), 1)

    with pytest.raises(ArgumentError, match="--recompute-method"):
        validate(["--recompute-granularity", "full"])
    with pytest.raises(ArgumentError, match="need --recompute-granularity full"):
        validate(["--recompute-method", "block", "--recompute-num-layers", "1"])
    with pytest.raises(ArgumentError, match="must divide"):
        validate(FULL_UNIFORM[:-1] + ["3"])
    assert validate(FULL_UNIFORM).recompute_num_layers == 2
