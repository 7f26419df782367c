"""--no-save-optim, --no-save-rng, --finetune, --use-checkpoint-args, --optimizer sgd and loading
a checkpoint written before the scheduler was saved as Megatron-LM's opt_param_scheduler."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import ckpt, run_training, tiny_args

OLD_CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "checkpoint_v1")
# The arguments the version-1 checkpoint was trained with (3 iterations, by the code of 4ca3f1e).
OLD_ARGV = ["--model", "mosaic-v2", "--mock-data", "--vocab-size", "64", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--short-term-window", "8", "--long-term-delay-range", "2", "6",
            "--long-term-inference-delay", "4", "--eval-iters", "0", "--per-position-eval-iters", "0",
            "--no-progress-bar", "--num-workers", "0", "--hidden-dropout", "0"]


def _common(path: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


def _options(rank: int, world_size: int, root: str) -> dict:
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    sgd = ["--optimizer", "sgd", "--lr", "0.05"]
    out: dict = {}
    run_training("mosaic-v2", sgd + ["--train-iters", "2", "--save", ckpt(root, "a"),
                                     "--no-save-optim", "--no-save-rng"], world_size)
    a = _common(ckpt(root, "a", 2))
    out["a_keys"], out["a_rng"] = sorted(a), a["args"]["has_rng_state"]
    # Resuming from it: a fresh optimizer and scheduler, RNG not restored; saves everything.
    b = run_training("mosaic-v2", sgd + ["--train-iters", "3", "--load", ckpt(root, "a"),
                                         "--save", ckpt(root, "b")], world_size)
    out["b_steps"], out["b_keys"] = len(b["losses"]), sorted(_common(ckpt(root, "b", 3)))
    # SGD momentum buffers are sharded state: resuming from b loads them.
    c = run_training("mosaic-v2", sgd + ["--train-iters", "4", "--load", ckpt(root, "b")], world_size)
    out["c_steps"] = len(c["losses"])
    # --finetune: b's weights, iteration 0, a fresh schedule (warmup starts at lr 0).
    args = tiny_args("mosaic-v2", sgd + ["--train-iters", "2", "--load", ckpt(root, "b"),
                                         "--finetune"], world_size)
    initialize_distributed(args)
    run = Run(args)
    out["ft"] = (run.state.iteration, run.state.consumed_samples, run.optimizer.param_groups[0]["lr"],
                 run.scheduler.num_steps)
    out["ft_weights"] = all(torch.equal(b["params"][f"0.{n}"], p)
                            for n, p in run.model[0].named_parameters())
    run.finish()
    # --use-checkpoint-args: the model shape comes from b, whatever the command line says.
    parsed = parse_args(["--mock-data", "--vocab-size", "64", "--model", "gpt", "--hidden-size", "64",
                         "--num-layers", "6", "--load", ckpt(root, "b"), "--use-checkpoint-args"],
                        world_size)
    out["uca"] = (parsed.model, parsed.hidden_size, parsed.num_layers, parsed.short_term_window)
    return out


def test_checkpoint_options(tmp_path):
    (r,) = run_distributed(_options, 1, str(tmp_path))
    assert "optimizer" not in r["a_keys"] and "opt_param_scheduler" not in r["a_keys"], r["a_keys"]
    assert r["a_rng"] is False
    assert r["b_steps"] == 1 and {"optimizer", "opt_param_scheduler"} <= set(r["b_keys"])
    assert "scheduler" not in r["b_keys"] and r["c_steps"] == 1
    assert r["ft"] == (0, 0, 0.0, 0) and r["ft_weights"]
    assert r["uca"] == ("mosaic-v2", 32, 4, 8)


def _old_checkpoint(rank: int, world_size: int) -> dict:
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    args = parse_args(OLD_ARGV + ["--train-iters", "4", "--load", OLD_CHECKPOINT], world_size)
    initialize_distributed(args)
    run = Run(args)
    loaded = (run.state.iteration, run.state.consumed_samples, run.scheduler.num_steps,
              run.scheduler.lr_decay_steps, run.optimizer.param_groups[0]["lr"])
    run.fit()
    run.finish()
    return {"loaded": loaded, "losses": run.losses}


def test_version_1_checkpoint_still_loads():
    """Its scheduler counted iterations (3 of 4 samples, warmup 1, cosine over 3): converted to
    samples it resumes at the end of the decay, lr = --min-lr, as the old code would."""
    (r,) = run_distributed(_old_checkpoint, 1)
    iteration, consumed, num_steps, decay_steps, lr = r["loaded"]
    assert (iteration, consumed, num_steps, decay_steps) == (3, 12, 12, 12)
    assert lr == pytest.approx(3e-4)
    assert len(r["losses"]) == 1 and all(map(torch.isfinite, torch.tensor(r["losses"])))
