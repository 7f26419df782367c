"""Optimizer state of checkpoints saved by another optimizer.

A checkpoint of the torch AdamW used before Megatron's optimizer (tests/training/data/
checkpoint_v1, 3 Adam steps) loads into Megatron's FP32Optimizer with its moments and step;
into the distributed optimizer the load stops with one line naming --no-load-optim, which then
loads the weights with a fresh optimizer (the distributed and the plain optimizer load each
other's checkpoints: test_dist_opt_checkpoint_cross.py). A --bf16 run resumes
exactly (its checkpoint holds the fp32 main weights).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.test_checkpoint_options import OLD_ARGV, OLD_CHECKPOINT


def _saved_moment(path: str, model, param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """``name`` of ``param`` as stored in the checkpoint (key optimizer.state.NAME.<param key>)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_mosaic.training.checkpointing import _unwrap

    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    tensor = next(t for t in _unwrap(model).sharded_state_dict().values()
                  if isinstance(t, ShardedTensor) and t.data is param)
    assert tensor.prepend_axis_num == 0  # a layer's slice alone would be an invalid access
    want = make_sharded_optimizer_tensor(tensor, torch.empty_like(param), f"optimizer.state.{name}")
    return dist_checkpointing.load({"x": want}, path)["x"]


def _formats(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.checkpointing import CheckpointMismatchError, _resolve
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run

    out: dict = {}
    args = parse_args(OLD_ARGV + ["--train-iters", "4", "--load", OLD_CHECKPOINT], world_size)
    initialize_distributed(args)
    run = Run(args)
    states = {id(p): s for o in run.optimizer._optimizers() for p, s in o.optimizer.state.items()}
    params = list(run.optimizer.parameters())
    out["steps"] = sorted({float(states[id(p)]["step"]) for p in params})
    path = _resolve(OLD_CHECKPOINT)
    outside_layers = [p for n, p in run.model[0].named_parameters() if ".layers." not in n]
    out["moments_equal"] = len(outside_layers) >= 2 and all(  # embedding, final norm
        torch.equal(states[id(p)][k], _saved_moment(path, run.model[0], p, k))
        for p in outside_layers for k in ("exp_avg", "exp_avg_sq"))
    out["moments_nonzero"] = all(bool(states[id(p)]["exp_avg_sq"].any()) for p in params)
    parallel_state.destroy_model_parallel()

    sharded = parse_args(OLD_ARGV + ["--train-iters", "4", "--load", OLD_CHECKPOINT,
                                      "--use-distributed-optimizer"], world_size)
    initialize_distributed(sharded)
    try:
        Run(sharded)
        out["refused"] = None
    except CheckpointMismatchError as err:
        out["refused"] = str(err)
    parallel_state.destroy_model_parallel()
    sharded.no_load_optim = True
    initialize_distributed(sharded)
    out["no_load_optim_iteration"] = Run(sharded).state.iteration
    return out


def test_old_optimizer_state_converts_or_is_refused_in_one_line():
    (r,) = run_distributed(_formats, 1)
    assert r["steps"] == [3.0], r["steps"]
    assert r["moments_equal"] and r["moments_nonzero"]
    message = r["refused"]
    assert message is not None and "\n" not in message, message
    assert "--no-load-optim" in message and "torch AdamW of earlier versions" in message
    assert r["no_load_optim_iteration"] == 3


def _bf16_resume(rank: int, world_size: int, root: str) -> dict:
    from megatron.core import parallel_state

    from tests.training.common import ckpt, run_training

    bf16 = ["--bf16", "--train-iters", "4"]
    straight = run_training("mosaic-v2", bf16, world_size)
    parallel_state.destroy_model_parallel()
    command = bf16 + ["--save", ckpt(root, "bf16"), "--load", ckpt(root, "bf16"), "--exit-interval", "2"]
    first = run_training("mosaic-v2", command, world_size)
    parallel_state.destroy_model_parallel()
    second = run_training("mosaic-v2", command, world_size)
    return {"straight": straight["losses"], "resumed": first["losses"] + second["losses"],
            "weights_equal": all(torch.equal(straight["params"][k], second["params"][k])
                                 for k in straight["params"])}


def test_bf16_resume_is_exact(tmp_path):
    """--bf16 checkpoints hold the fp32 main weights beside the bf16 ones: a resume is exact."""
    (r,) = run_distributed(_bf16_resume, 1, str(tmp_path))
    assert len(r["straight"]) == 4 and r["resumed"] == r["straight"], r
    assert r["weights_equal"]
