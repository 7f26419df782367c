"""Checkpoints cross between the distributed and the plain optimizer (Adam moments and step).

Both store each parameter's moments shaped like the parameter under the same keys
(``optimizer.state.exp_avg.<parameter>``); the step (param groups vs ``common_step``) and the
fp32 main weights (``param`` vs ``fp32_param``; an fp32 plain run has none but the weights)
are translated by ``MegatronOptimizer``. One chain per dtype at DP=2: the distributed optimizer
saves at step 3, the plain one continues from it and saves at step 4, the distributed one
continues from that for step 5; the plain one also continues from step 3 at DP=1. A step's loss
depends on the optimizer state of the steps before it only through the weights, so step 5 of
each continuation (after a step with the restored moments and step) is the check; every loss
is compared with the uninterrupted distributed run. fp32: within 1e-6 relative (reduction
order differs between the optimizers and DP sizes; measured 0 here); --bf16: equal, final
weights too (the fp32 main weights cross). The final weights are compared as well (within 1e-6
relative for fp32): an Adam update moves each weight by about lr, so a missing moment or a
wrong step shows there even where the loss hardly moves.
"""

from __future__ import annotations

from tests.distributed import run_distributed
from tests.training.common import ckpt, run_training

DIST = ["--use-distributed-optimizer"]
BF16 = ["--bf16"]


def _run(root: str, extra: list[str], world_size: int, save: str, save_at: int,
         load: tuple[str, int] | None = None) -> dict:
    from megatron.core import parallel_state

    command = extra + ["--train-iters", "5", "--save-interval", str(save_at), "--save", ckpt(root, save)]
    if load:
        command += ["--load", ckpt(root, *load)]
    out = run_training("mosaic-v2", command, world_size)
    parallel_state.destroy_model_parallel()
    return out


def _dp2(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for dtype, extra in (("fp32", []), ("bf16", BF16)):
        straight = _run(root, DIST + extra, world_size, f"dist_{dtype}", 3)
        plain = _run(root, extra, world_size, f"plain_{dtype}", 4, (f"dist_{dtype}", 3))
        dist = _run(root, DIST + extra, world_size, f"dist_again_{dtype}", 5, (f"plain_{dtype}", 4))
        out[dtype] = {"straight": straight["losses"], "plain_from_dist": plain["losses"],
                      "dist_from_plain": dist["losses"],
                      "weight_diff": _weight_diff(plain, straight) + _weight_diff(dist, straight)}
        out["fp32_params"] = out.get("fp32_params", straight["params"])
    return out


def _weight_diff(run: dict, reference: dict) -> list[float]:
    """Largest relative difference of each final weight tensor (compared in fp32)."""
    return [float((p.float() - reference["params"][k].float()).abs().max()
                  / reference["params"][k].float().abs().max()) for k, p in run["params"].items()]


def _dp1(rank: int, world_size: int, root: str, straight_params: dict) -> dict:
    run = _run(root, [], world_size, "dp1", 5, ("dist_fp32", 3))
    return {"plain_from_dist": run["losses"],
            "weight_diff": _weight_diff(run, {"params": straight_params})}


def _gap(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want) and got, (got, want)
    return max(abs(a - b) / abs(b) for a, b in zip(got, want))


def test_checkpoints_cross_between_distributed_and_plain_optimizer(tmp_path):
    root = str(tmp_path)
    results = run_distributed(_dp2, 2, root)
    fp32, bf16 = results[0]["fp32"], results[0]["bf16"]
    (dp1,) = run_distributed(_dp1, 1, root, results[0]["fp32_params"])
    gaps = {"DP=2 plain from distributed": _gap(fp32["plain_from_dist"], fp32["straight"][3:]),
            "DP=2 distributed from plain": _gap(fp32["dist_from_plain"], fp32["straight"][4:]),
            "DP=1 plain from distributed": _gap(dp1["plain_from_dist"], fp32["straight"][3:])}
    weights = {"DP=2 fp32": max(fp32["weight_diff"]), "DP=1 fp32": max(dp1["weight_diff"])}
    print("relative loss gaps:", {k: f"{g:.1e}" for k, g in gaps.items()},
          "relative weight gaps:", {k: f"{g:.1e}" for k, g in weights.items()})
    assert all(g <= 1e-6 for g in gaps.values()), gaps
    # Adam's update is ~lr (3e-3 here) per weight: missing moments or a wrong step show here.
    assert all(g <= 1e-6 for g in weights.values()), weights
    assert len(bf16["plain_from_dist"]) == 2 and bf16["plain_from_dist"] == bf16["straight"][3:], bf16
    assert len(bf16["dist_from_plain"]) == 1 and bf16["dist_from_plain"] == bf16["straight"][4:], bf16
    assert max(bf16["weight_diff"]) == 0.0, max(bf16["weight_diff"])
    for rank, r in enumerate(results[1:], start=1):
        assert r["bf16"]["dist_from_plain"] == bf16["dist_from_plain"], rank
