"""Megatron's optimizer: parameter groups (no decay on norms, biases, per-head scalars), the LR
schedule, clipping, and the non-finite-norm contract."""

from __future__ import annotations

import math

import torch

from tests.distributed import run_distributed
from tests.training.common import tiny_args

PER_HEAD = ("leak", "key_scale", "mix", "value_scale", "output_scale", "bandwidth_theta0",
            "bandwidth_theta1", "bandwidth_theta_alpha")


def _groups_schedule_and_clipping(rank: int, world_size: int) -> dict:
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.model_builder import build_model, wrap_for_training
    from megatron_mosaic.training.megatron_optimizer import MegatronOptimizer
    from megatron_mosaic.training.optimizer import build_scheduler

    out: dict = {}
    for model in ("mosaic-v1", "mosaic-v2"):
        args = tiny_args(model, ["--weight-decay", "0.1", "--lr", "1e-3", "--min-lr", "1e-4",
                                 "--lr-warmup-iters", "2", "--train-iters", "10",
                                 "--clip-grad", "0.5"], world_size)
        initialize_distributed(args)
        args.padded_vocab_size = 128
        chunks = wrap_for_training(build_model(args))
        optimizer = MegatronOptimizer(chunks, args)
        scheduler = build_scheduler(optimizer, args)
        names = {id(p): n for n, p in chunks[0].named_parameters()}
        groups = optimizer.param_groups
        decay = [names[id(p)] for g in groups if g["wd_mult"] == 1.0 for p in g["params"]]
        no_decay = [names[id(p)] for g in groups if g["wd_mult"] == 0.0 for p in g["params"]]
        assert len(decay) + len(no_decay) == len(names), "a parameter is in no group"
        lrs, wds = [], []
        for _ in range(11):
            lrs.append(groups[0]["lr"])
            wds.append(sorted({g["weight_decay"] for g in groups}))
            scheduler.step(args.global_batch_size)  # the scheduler counts samples
        # Clipping: with known gradients the pre-clip norm is returned and applied grads have norm 0.5.
        torch.manual_seed(0)
        params = list(optimizer.parameters())
        for p in params:
            p.main_grad.copy_(torch.randn_like(p))
        expected = math.sqrt(sum(float(p.main_grad.double().pow(2).sum()) for p in params))
        norm = optimizer.step()
        clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        # A non-finite norm: returned, and neither weights nor Adam state move.
        before = [p.detach().clone() for p in params]
        state = lambda: [t.clone() for _, s in optimizer.optimizer.state.items() for t in s.values()]
        state_before = state()
        params[0].main_grad.view(-1)[0] = float("inf")
        inf_norm = optimizer.step()
        untouched = all(torch.equal(a, b) for a, b in zip(before, params)) and all(
            torch.equal(a, b) for a, b in zip(state_before, state())) and len(state_before) > 0
        # torch's AdamW picks its multi-tensor (foreach) kernels on CUDA unless told otherwise.
        torch_adamw = optimizer._optimizers()[0].optimizer
        from megatron_mosaic.training.megatron_patches import needed as torch_fallback

        out[model] = {"foreach": (type(torch_adamw).__name__, torch_adamw.defaults.get("foreach"))
                      if torch_fallback() else ("AdamW", None),  # TE/Apex: their fused Adam
                      "decay": decay, "no_decay": no_decay, "lrs": lrs, "wds": wds,
                      "norm": norm, "expected_norm": expected, "clipped": clipped,
                      "inf_norm": inf_norm, "untouched": untouched}
    return out


def test_param_groups_schedule_and_clipping():
    (result,) = run_distributed(_groups_schedule_and_clipping, 1)
    for model, r in result.items():
        for name in r["no_decay"]:
            assert ("norm" in name or name.endswith(".bias") or name.split(".")[-1] in PER_HEAD), \
                f"{model}: {name} skips weight decay"
        for name in r["decay"]:
            assert name.endswith("weight") or name.endswith(("memory_keys", "memory_values")), \
                f"{model}: {name} is decayed"
            assert "norm" not in name
        assert any(n.split(".")[-1] in PER_HEAD for n in r["no_decay"]), model
        if model == "mosaic-v1":
            assert any(n.endswith(".bias") for n in r["no_decay"])
        lrs = r["lrs"]
        assert lrs[0] == 0.0 and math.isclose(lrs[1], 5e-4) and math.isclose(lrs[2], 1e-3)
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])), f"cosine decay: {lrs}"
        assert math.isclose(lrs[10], 1e-4)
        assert all(wd == [0.0, 0.1] for wd in r["wds"]), r["wds"]
        # Megatron sums squares in fp32 (we in fp64): 2.4e-8 relative apart, measured.
        assert math.isclose(r["norm"], r["expected_norm"], rel_tol=1e-6)
        assert math.isclose(r["clipped"], 0.5, rel_tol=1e-5)
        assert math.isinf(r["inf_norm"]) and r["untouched"], model
        assert r["foreach"] == ("AdamW", None), r["foreach"]
