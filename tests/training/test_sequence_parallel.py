"""--sequence-parallel with TP=2 trains like TP=1 and like TP=2 without it.

Hidden states between the TP regions are sharded along the sequence; every memory (and the
baseline's attention) gathers the sequence before its projections and its output projection
reduce-scatters it; norm gradients are summed over TP. Only the order of float reductions
changes, so losses must match TP=1 and the gradients and weights TP=2 within 1e-5 relative.
"""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.training.common import tiny_args

MODELS = ("mosaic-v2", "mosaic-v1", "gpt")
TP2 = ["--tensor-model-parallel-size", "2"]
STEPS = ["--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0"]


def _train(model: str, extra: list[str], world_size: int) -> dict:
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    args = tiny_args(model, STEPS + extra, world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()
    chunk = run.model[0]
    return {"losses": run.losses, "sp": chunk.config.sequence_parallel,
            "params": {n: p.detach().clone() for n, p in chunk.named_parameters()},
            "grads": {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters()}}


def _runs(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    out = {}
    for model in MODELS:
        runs = {}
        for name, extra in (("tp1", []), ("tp2", TP2), ("tp2_sp", TP2 + ["--sequence-parallel"])):
            parallel_state.destroy_model_parallel()
            runs[name] = _train(model, extra, world_size)
        out[model] = runs
    return out


def test_sequence_parallel_matches_tp1_and_tp2():
    for rank, per_model in enumerate(run_distributed(_runs, 2)):
        for model, runs in per_model.items():
            tp1, tp2, sp = runs["tp1"], runs["tp2"], runs["tp2_sp"]
            assert sp["sp"] and not tp2["sp"], "the --sequence-parallel run did not use it"
            assert sum(g.abs().sum() for g in tp2["grads"].values()) > 0, f"{model}: no gradients"
            for a, b in zip(sp["losses"], tp1["losses"]):
                assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} {model}: SP loss {a} != TP=1 {b}"
            for kind in ("grads", "params"):
                assert sp[kind].keys() == tp2[kind].keys()
                # Gradients: absolute tolerance from the largest gradient anywhere (per-head
                # scalars get ~1e-10 gradients whose last bits follow the reduction order).
                top = max(float(t.abs().max()) for t in tp2[kind].values())
                for name, want in tp2[kind].items():
                    scale = top if kind == "grads" else max(float(want.abs().max()), 1e-8)
                    torch.testing.assert_close(sp[kind][name], want, rtol=1e-5, atol=1e-5 * scale,
                                               msg=lambda m: f"rank {rank} {model} {kind} {name}: {m}")


def test_sequence_parallel_needs_tp():
    import pytest

    from megatron_mosaic.training.arguments import ArgumentError, build_parser, validate_args
    from tests.training.common import TINY

    with pytest.raises(ArgumentError, match="--sequence-parallel needs"):
        validate_args(build_parser().parse_args(TINY + ["--model", "gpt", "--sequence-parallel"]), 1)


# SP composed with the other splits: TP=2 x PP=2 and TP=2 x CP=2 (four ranks), each with and
# without --sequence-parallel. Sequence parallelism shards along the sequence inside each CP chunk
# and inside each pipeline stage; it must not change the trajectory.
COMPOSED = {"pp2": TP2 + ["--pipeline-model-parallel-size", "2"],
            "cp2": TP2 + ["--context-parallel-size", "2"]}


def _composed_runs(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    out = {}
    for model in ("mosaic-v2", "gpt"):
        for name, extra in COMPOSED.items():
            for sp in (False, True):
                parallel_state.destroy_model_parallel()
                out[(model, name, sp)] = _train(model, extra + (["--sequence-parallel"] if sp else []),
                                                world_size)
    return out


def test_sequence_parallel_composes_with_pipeline_and_context_parallel():
    results = run_distributed(_composed_runs, 4)
    for key in results[0]:
        assert any(runs[key]["losses"] for runs in results), f"{key}: no rank reported losses"
    for rank, runs in enumerate(results):
        for (model, name, sp), run in runs.items():
            if not sp:
                continue
            plain = runs[(model, name, False)]
            assert run["sp"] and not plain["sp"]
            where = f"rank {rank} {model} {name}"
            # Losses are reported by the last pipeline stage only; other stages hold none.
            assert len(run["losses"]) == len(plain["losses"])
            for a, b in zip(run["losses"], plain["losses"]):
                assert abs(a - b) <= 1e-5 * abs(b), f"{where}: SP loss {a} != {b}"
            top = max(float(t.abs().max()) for t in plain["grads"].values())
            assert top > 0, f"{where}: no gradients"
            for name_, want in plain["params"].items():
                torch.testing.assert_close(run["params"][name_], want, rtol=1e-5,
                                           atol=1e-5 * max(float(want.abs().max()), 1e-8),
                                           msg=lambda m: f"{where} {name_}: {m}")
