"""tools/estimate_memory.py against real CPU runs: within 15%.

Each case trains one step of a small model through the real training path at 2 ranks and
measures this rank's bytes: parameters, Megatron DDP gradient buffers, Adam state and the
activations one micro-batch's forward pass keeps for backward (``SavedTensorMeter``). The
estimator, given the same arguments, must match the total and the activations within 15%.
Shapes differ from the ones the activation coefficients were fitted at (d=64/128, H=4/8, T=1024).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import tiny_args
from tools.estimate_memory import Layout, Model, estimate

SHAPE = ["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--ffn-hidden-size", "384",
         "--seq-length", "768", "--micro-batch-size", "1", "--global-batch-size", "2", "--short-term-window", "96",
         "--long-term-delay-range", "32", "32", "--persistent-memory-size", "336", "--vocab-size", "256",
         "--train-iters", "1", "--lr-decay-style", "constant", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--no-document-masking"]
TP2 = ["--tensor-model-parallel-size", "2"]
CASES = [("mosaic-v2", TP2 + ["--sequence-parallel"]), ("mosaic-v2", ["--recompute-granularity", "selective"]),
         ("mosaic-v1", TP2), ("gpt", TP2)]


def _measure(model: str, extra: list[str], world_size: int) -> dict:
    from megatron_mosaic.model.context import micro_batch_context
    from megatron_mosaic.training.activation_memory import SavedTensorMeter
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    args = tiny_args(model, SHAPE + extra, world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()
    params = [p for chunk in run.model for p in chunk.parameters()]
    tokens = torch.randint(0, 200, (args.micro_batch_size, args.seq_length), generator=torch.Generator().manual_seed(0))
    with SavedTensorMeter(params) as meter:
        run.model[0](tokens, labels=tokens, packed_seq_params=micro_batch_context(tokens, 32))
    measured = {"weights": sum(p.numel() * p.element_size() for p in params),
                "grads": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params),
                "optimizer": run.optimizer.state_bytes(), "activations": meter.bytes}
    measured["total"] = sum(measured.values())
    layout = Layout(tp=args.tensor_model_parallel_size, dp=args.data_parallel_size, micro_batch=args.micro_batch_size,
                    seq_length=args.seq_length, num_microbatches=1, recompute=args.recompute_granularity or "none",
                    sequence_parallel=args.sequence_parallel)
    shape = Model(model, args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size,
                  args.padded_vocab_size, args.short_term_window, args.persistent_memory_size)
    return {"measured": measured, "estimate": estimate(shape, layout)}


def _all(rank: int, world_size: int) -> list:
    from megatron.core import parallel_state

    out = []
    for model, extra in CASES:
        parallel_state.destroy_model_parallel()
        out.append((model, extra, _measure(model, extra, world_size)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all, 2)


def test_estimate_matches_measured_cpu_runs(results):
    for rank, cases in enumerate(results):
        for model, extra, r in cases:
            measured, est = r["measured"], r["estimate"]
            what = f"rank {rank} {model} {' '.join(extra)}"
            assert measured["weights"] == pytest.approx(est["weights"], rel=0.01), f"{what}: weights"
            assert measured["optimizer"] == pytest.approx(est["optimizer"], rel=0.01), f"{what}: optimizer"
            for key in ("activations", "total"):
                assert abs(est[key] - measured[key]) <= 0.15 * measured[key], (
                    f"{what}: {key} estimated {est[key] / 2**20:.1f} MiB, measured {measured[key] / 2**20:.1f} MiB")


def test_estimate_shrinks_with_each_saving():
    large = Model("mosaic-v2", 32, 4096, 32, 14336, 128256)
    base = Layout(tp=8, pp=4, dp=4, seq_length=32768, precision="bf16")
    plain = estimate(large, base)
    for change in (dict(sequence_parallel=True), dict(recompute="selective"), dict(recompute="full")):
        assert estimate(large, Layout(**{**base.__dict__, **change}))["activations"] < plain["activations"], change
    sharded = estimate(large, Layout(**{**base.__dict__, "distributed_optimizer": True}))
    assert sharded["optimizer"] == pytest.approx(plain["optimizer"] / 4)
