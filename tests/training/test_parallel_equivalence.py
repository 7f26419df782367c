"""DP=2, TP=2, PP=2 (1F1B), virtual PP and CP=2 reproduce the single-process loss trajectory.

A single process saves the initial weights (iteration 0) and trains 5 steps, checkpointing at
step 2 (non-zero Adam moments). Each 2-rank layout then (a) loads the initial weights and
trains 5 steps, and (b) loads the step-2 checkpoint, written at another DP/TP/PP layout, and
trains 3 more. Every loss must match the reference within 1e-5 relative (fp32).
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.training.common import ckpt, run_training

MODELS = ("mosaic-v2", "mosaic-v1", "gpt")
LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2_1f1b": ["--pipeline-model-parallel-size", "2"],
    "pp2_virtual": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "cp2": ["--context-parallel-size", "2"],
    # bf16 autocast (fp32 master weights) across TP and PP: bf16 precision, not fp32's.
    "tp2_bf16": ["--tensor-model-parallel-size", "2", "--bf16"],
    "pp2_bf16": ["--pipeline-model-parallel-size", "2", "--bf16"],
}
TOLERANCE = {"tp2_bf16": 2e-2, "pp2_bf16": 2e-2}
# Which models each layout trains (each 2-rank spawn costs ~10 s, each model ~3 s).
LAYOUT_MODELS = {
    "dp2": ("mosaic-v2",),
    "tp2": ("mosaic-v2", "mosaic-v1", "gpt"),
    "pp2_1f1b": ("mosaic-v2", "mosaic-v1"),  # v1 ties its output layer to the embedding across stages
    "pp2_virtual": ("mosaic-v2",),
    "cp2": ("mosaic-v2", "gpt"),
    "tp2_bf16": ("mosaic-v2", "mosaic-v1"),
    "pp2_bf16": ("mosaic-v2", "gpt"),  # gpt's stages end in bf16, mosaic's in fp32
}


def _reference(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for model in MODELS:
        run_training(model, ["--train-iters", "0", "--save", ckpt(root, f"{model}-init")], world_size)
        summary = run_training(model, ["--train-iters", "5", "--load", ckpt(root, f"{model}-init"),
                                       "--save", ckpt(root, f"{model}-ref"), "--save-interval", "2"],
                               world_size)
        out[model] = summary["losses"]
    return out


def _parallel(rank: int, world_size: int, root: str, layout: list[str], models: tuple) -> dict:
    out = {}
    for model in models:
        from_init = run_training(model, layout + ["--train-iters", "5",
                                                  "--load", ckpt(root, f"{model}-init")], world_size)
        resumed = run_training(model, layout + ["--train-iters", "5",
                                                "--load", ckpt(root, f"{model}-ref", 2)], world_size)
        out[model] = (from_init["losses"], resumed["losses"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("equivalence"))
    return root, run_distributed(_reference, 1, root)[0]


def _assert_close(actual: list[float], expected: list[float], what: str, rtol: float) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} losses, expected {len(expected)}"
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= rtol * abs(e), f"{what}: step {step} loss {a!r} != reference {e!r}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, layout):
    root, ref = reference
    for model, losses in ref.items():
        assert len(losses) == 5 and losses[-1] < losses[0], f"{model}: reference did not train: {losses}"
    results = run_distributed(_parallel, 2, root, LAYOUTS[layout], LAYOUT_MODELS[layout])
    for rank, per_model in enumerate(results):
        for model, (from_init, resumed) in per_model.items():
            rtol = TOLERANCE.get(layout, 1e-5)
            _assert_close(from_init, ref[model], f"{layout} rank {rank} {model} from iteration 0",
                          rtol)
            _assert_close(resumed, ref[model][2:], f"{layout} rank {rank} {model} from the "
                                                   f"single-process step-2 checkpoint", rtol)
