"""Exact resume, divergence stop, early exits and crash-safe checkpoints (2 ranks, DP=2).

Dropout is on, so the resumed run only matches if every rank's RNG state is restored; gradient
accumulation (2 micro-batches per rank) and the v2 per-step delay are exercised too.
"""

from __future__ import annotations

import os

import torch

from tests.distributed import run_distributed
from tests.training.common import ckpt, run_training

RESUME = ["--hidden-dropout", "0.1", "--train-iters", "6", "--eval-interval", "2", "--eval-iters", "1"]


def _exact_resume(rank: int, world_size: int, root: str) -> dict:
    straight = run_training("mosaic-v2", RESUME + ["--save", ckpt(root, "straight")], world_size)
    # The user's flow: the same command twice, stopping at step 3 (--exit-interval), resuming.
    command = RESUME + ["--save", ckpt(root, "resumed"), "--load", ckpt(root, "resumed"),
                        "--exit-interval", "3"]
    first = run_training("mosaic-v2", command, world_size)
    second = run_training("mosaic-v2", command, world_size)
    same_weights = straight["params"].keys() == second["params"].keys() and all(
        torch.equal(straight["params"][k], second["params"][k]) for k in straight["params"])
    return {"straight": straight["losses"], "first": first["losses"], "second": second["losses"],
            "first_exit": first["exit_reason"], "weights_equal": same_weights}


def test_exact_resume_is_bitwise(tmp_path):
    results = run_distributed(_exact_resume, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["first_exit"] == "reached --exit-interval 3", r["first_exit"]
        assert len(r["straight"]) == 6 and len(r["first"]) == 3 and len(r["second"]) == 3
        assert r["first"] == r["straight"][:3], f"rank {rank}: {r['first']} vs {r['straight'][:3]}"
        assert r["second"] == r["straight"][3:], f"rank {rank}: resumed {r['second']} vs straight " \
                                                 f"{r['straight'][3:]}"
        assert r["weights_equal"], f"rank {rank}: final checkpoints differ"


def _failures(rank: int, world_size: int, root: str) -> dict:
    from megatron_mosaic.training import checkpointing
    from megatron_mosaic.training.checkpointing import read_tracker, save_checkpoint
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.loop import TrainingDivergedError
    from megatron_mosaic.training.pretrain import Run
    from tests.training.common import tiny_args

    out: dict = {}
    # 1. A loss that turns NaN at step 3 stops the run naming the iteration; nothing is saved.
    save_dir = ckpt(root, "diverge")
    args = tiny_args("mosaic-v2", ["--train-iters", "4", "--save", save_dir, "--save-interval", "1",
                                   "--exit-interval", "2"], world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()
    saved_at_2 = {n: p.detach().clone() for n, p in run.model[0].named_parameters()}
    for name, param in run.model[0].named_parameters():
        if "final_layernorm" in name:
            param.data.fill_(float("nan"))  # every logit becomes NaN from the next step on
    try:
        run.fit()
        out["diverged"] = None
    except TrainingDivergedError as err:
        out["diverged"] = str(err)
    out["tracker_after_divergence"] = read_tracker(save_dir)
    out["dirs_after_divergence"] = sorted(os.listdir(save_dir))

    # 2. A non-finite gradient norm leaves the weights untouched.
    before = [p.detach().clone() for p in run.optimizer.parameters()]
    for param in run.optimizer.parameters():
        param.main_grad.fill_(0.0)
    next(iter(run.optimizer.parameters())).main_grad.view(-1)[0] = float("inf")
    norm = run.optimizer.step()
    out["inf_grad_norm"] = norm
    out["inf_grad_untouched"] = all(  # equal_nan: the final norm still holds the NaNs of step 1
        torch.allclose(a, b.detach(), rtol=0.0, atol=0.0, equal_nan=True)
        for a, b in zip(before, run.optimizer.parameters()))

    # 3. A crash in the middle of writing iteration 3 keeps iteration 2 the loadable one, and
    #    the partial directory is removed. (The weights are made finite again first: a
    #    checkpoint with NaN weights is refused before anything is written.)
    with torch.no_grad():
        for name, param in run.model[0].named_parameters():
            param.copy_(saved_at_2[name])
    real_save = checkpointing.dist_checkpointing.save

    def crashing_save(state, path, **kwargs):
        with open(os.path.join(path, f"__{rank}_0.distcp"), "wb") as f:
            f.write(b"half a shard")
        raise RuntimeError("simulated crash while writing")

    checkpointing.dist_checkpointing.save = crashing_save
    try:
        save_checkpoint(save_dir, 3, run.model, run.optimizer, run.scheduler, args={"x": 1})
        out["crash_raised"] = None
    except checkpointing.CheckpointSaveError as err:
        out["crash_raised"] = str(err)
    finally:
        checkpointing.dist_checkpointing.save = real_save
    out["tracker_after_crash"] = read_tracker(save_dir)
    out["dirs_after_crash"] = sorted(os.listdir(save_dir))
    reloaded = Run(tiny_args("mosaic-v2", ["--train-iters", "4", "--load", save_dir], world_size))
    out["reloaded_iteration"] = reloaded.state.iteration
    out["reloaded_equal"] = all(torch.equal(saved_at_2[n], p.detach())
                                for n, p in reloaded.model[0].named_parameters())

    # 4. Loading a checkpoint of another shape fails first, naming the arguments.
    from megatron_mosaic.training.checkpointing import CheckpointMismatchError

    try:
        Run(tiny_args("mosaic-v2", ["--load", save_dir, "--hidden-size", "64"], world_size))
        out["mismatch"] = None
    except CheckpointMismatchError as err:
        out["mismatch"] = str(err)

    # 5. --exit-duration-in-mins stops after the first step that exceeds it, saving first.
    limited = ckpt(root, "limited")
    summary = run_training("mosaic-v2", ["--train-iters", "5", "--save", limited,
                                         "--exit-duration-in-mins", "1e-9"], world_size)
    out["duration_exit"] = summary["exit_reason"]
    out["duration_tracker"] = read_tracker(limited)
    return out


def test_divergence_crash_and_duration_limit(tmp_path):
    for rank, r in enumerate(run_distributed(_failures, 2, str(tmp_path))):
        assert r["diverged"] is not None and "iteration 3" in r["diverged"], r["diverged"]
        assert "nan" in r["diverged"]
        assert r["tracker_after_divergence"] == 2
        assert r["dirs_after_divergence"] == ["iter_0000001", "iter_0000002",
                                              "latest_checkpointed_iteration.txt"]
        assert r["inf_grad_norm"] == float("inf") and r["inf_grad_untouched"]
        assert "simulated crash while writing" in r["crash_raised"], r["crash_raised"]
        assert "the partial directory was removed and the latest checkpoint is still iteration 2" in r["crash_raised"]
        assert r["tracker_after_crash"] == 2
        assert "iter_0000003" not in r["dirs_after_crash"]
        assert "iter_0000003.partial" not in r["dirs_after_crash"]
        assert r["reloaded_iteration"] == 2 and r["reloaded_equal"], f"rank {rank}"
        assert "--hidden-size 32 (checkpoint) vs 64 (now)" in r["mismatch"], r["mismatch"]
        assert r["duration_exit"].startswith("exceeded --exit-duration-in-mins")
        assert r["duration_tracker"] == 1
