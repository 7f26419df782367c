"""Five training steps with CP=2 reproduce CP=1: the same losses and final weights.

Both runs use the real training path (``tests.training.common.run_training``: arguments,
model builder, data path with ``slice_batch_for_cp_rank``, Megatron schedule, optimizer) in
the same gloo processes: with 2 ranks CP=1 is DP=2 (each rank half of the global batch, whole
sequences) and CP=2 is DP=1 (both ranks the whole batch, half of every sequence each); with 4
ranks the same comparison runs under pipeline parallelism (PP=2, 1F1B schedule).
"""

from __future__ import annotations

from megatron.core import parallel_state

from tests.distributed import run_distributed
from tests.training.common import run_training

MODELS = ("mosaic-v1", "mosaic-v2", "gpt")
RTOL = 1e-5


def _train_both(rank: int, world_size: int, models: tuple, extra: list[str]) -> dict:
    out = {}
    for model in models:
        # run_training keeps an initialised parallel state: reset it between the two layouts.
        parallel_state.destroy_model_parallel()
        cp1 = run_training(model, ["--train-iters", "5"] + extra, world_size)
        parallel_state.destroy_model_parallel()
        cp2 = run_training(model, ["--train-iters", "5", "--context-parallel-size", "2"] + extra, world_size)
        assert parallel_state.get_context_parallel_world_size() == 2, "the CP=2 run did not use CP"
        out[model] = (cp1["losses"], cp2["losses"], cp1["params"], cp2["params"])
    return out


def test_cp2_training_matches_cp1():
    _compare(run_distributed(_train_both, 2, MODELS, []))


def test_cp2_pp2_training_matches_pp2():
    """PP=2 × CP=2 (4 ranks) against PP=2. A rank dying on gloo's "Received data size doesn't
    match expected size" here means the pipeline schedule was given a CP-divided seq_length:
    megatron-core 0.16.1's get_tensor_shapes divides by the CP size itself, so the schedule
    must receive the full --seq-length."""
    _compare(run_distributed(_train_both, 4, ("mosaic-v2",), ["--pipeline-model-parallel-size", "2"]))


def _compare(results: list[dict]) -> None:
    for rank, per_model in enumerate(results):
        for model, (cp1, cp2, params1, params2) in per_model.items():
            assert len(cp1) == len(cp2) == 5, f"{model}: {len(cp1)} and {len(cp2)} losses, expected 5"
            assert cp1[-1] < cp1[0], f"{model}: the CP=1 run did not train: {cp1}"
            for step, (a, b) in enumerate(zip(cp1, cp2), start=1):
                assert abs(a - b) <= RTOL * abs(a), f"rank {rank} {model} step {step}: CP=2 loss {b!r} != CP=1 {a!r}"
            assert params1.keys() == params2.keys()
            for name, p1 in params1.items():
                err = (params2[name] - p1).abs().max().item()
                scale = p1.abs().max().item()
                assert err <= 1e-4 * max(scale, 1e-6), (
                    f"rank {rank} {model} {name}: final weights differ by {err:.2e} (scale {scale:.2e})"
                )
