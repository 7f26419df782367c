"""DP=2, TP=2, PP=2 (1F1B), virtual PP and CP=2 reproduce the single-process loss trajectory.

A single process trains 5 steps from scratch, checkpointing at step 2 (non-zero Adam moments).
Each 2-rank layout then (a) trains 5 steps from scratch with the same seed: no shared initial
checkpoint, so the layout must build the single-process initial weights itself, and (b) loads
the step-2 checkpoint, written at another DP/TP/PP layout, and trains 3 more. Every loss must
match the reference within 1e-5 relative (fp32). A direct check compares the initial weights
of PP=2 and virtual PP with the single process, parameter by parameter.
"""

from __future__ import annotations

import re

import pytest
import torch
from megatron.core import parallel_state

from megatron_mosaic.training.initialize import initialize_distributed, single_rank_megatron
from megatron_mosaic.training.model_builder import build_model, pad_vocab_size
from tests.distributed import run_distributed
from tests.training.common import ckpt, run_training, tiny_args

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
    """Per model: the 5 losses, and the weight matrices that training left at their initial
    values (the same seed builds the same initial weights again)."""
    out = {}
    for model in MODELS:
        summary = run_training(model, ["--train-iters", "5", "--save", ckpt(root, f"{model}-ref"),
                                       "--save-interval", "2"], world_size)
        initial = _initial_weights(model, [], world_size)
        final = {key.removeprefix("0.").removeprefix("module."): w for key, w in summary["params"].items()}  # DDP
        unmoved = [name for name, w in initial.items() if w.dim() >= 2 and torch.equal(w, final[name])]
        out[model] = (summary["losses"], unmoved)
    return out


def _parallel(rank: int, world_size: int, root: str, layout: list[str], models: tuple) -> dict:
    out = {}
    for model in models:
        from_scratch = run_training(model, layout + ["--train-iters", "5"], world_size)
        resumed = run_training(model, layout + ["--train-iters", "5",
                                                "--load", ckpt(root, f"{model}-ref", 2)], world_size)
        out[model] = (from_scratch["losses"], resumed["losses"])
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
    # "The reference trained" is checked on the weights, not the losses: 5 small steps move the
    # loss less than the batch-to-batch noise of the mock data (loss 1 < loss 5 is a coin toss).
    for model, (losses, unmoved) in ref.items():
        assert len(losses) == 5 and not unmoved, f"{model}: reference did not train: {losses}, {unmoved}"
    ref = {model: losses for model, (losses, _) in ref.items()}
    results = run_distributed(_parallel, 2, root, LAYOUTS[layout], LAYOUT_MODELS[layout])
    for rank, per_model in enumerate(results):
        for model, (from_scratch, resumed) in per_model.items():
            rtol = TOLERANCE.get(layout, 1e-5)
            _assert_close(from_scratch, ref[model], f"{layout} rank {rank} {model} from scratch", rtol)
            _assert_close(resumed, ref[model][2:], f"{layout} rank {rank} {model} from the "
                                                   f"single-process step-2 checkpoint", rtol)


# ------------------------------------------------------------------ initial weights, directly

INIT_LAYOUTS = {"pp2": LAYOUTS["pp2_1f1b"], "pp2_virtual": LAYOUTS["pp2_virtual"]}
LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _initial_weights(model: str, extra: list[str], world_size: int) -> dict[str, torch.Tensor]:
    """This rank's freshly built weights under single-process names: chunk-local layer indices
    become global ones, and v1's last-stage copy of the tied output weight is the embedding."""
    args = tiny_args(model, extra, world_size)
    args.padded_vocab_size = pad_vocab_size(args.vocab_size, args.tensor_model_parallel_size)
    initialize_distributed(args)
    out = {}
    for chunk in build_model(args):
        numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            name = LOCAL_LAYER.sub(lambda m: f"decoder.layers.{numbers[int(m[1])]}.", name)
            if model == "mosaic-v1" and name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"
            out[name] = param.detach().clone()
    return out


def _initial_weights_per_layout(rank: int, world_size: int) -> dict:
    out = {}
    for layout, extra in INIT_LAYOUTS.items():
        for model in MODELS:
            out[(layout, model)] = _initial_weights(model, extra, world_size)
        parallel_state.destroy_model_parallel()
    return out


def test_initial_weights_match_single_process_at_pp2_and_virtual_pp():
    """From scratch, every pipeline layout builds the single-process weights exactly: each layer
    draws from (seed, global layer number), the embedding / output layer / final norm from
    their own streams, whatever else the rank built before."""
    with single_rank_megatron():
        reference = {model: _initial_weights(model, [], 1) for model in MODELS}
    per_rank = run_distributed(_initial_weights_per_layout, 2)
    for layout in INIT_LAYOUTS:
        for model, want in reference.items():
            got = {}
            for weights in per_rank:
                got.update(weights[(layout, model)])
            assert got.keys() == want.keys(), f"{layout} {model}: {sorted(got.keys() ^ want.keys())}"
            differ = [name for name in want if not torch.equal(got[name], want[name])]
            assert not differ, f"{layout} {model}: initial weights differ from one process: {differ}"
