"""Each fix of ``training/megatron_patches.py`` is still needed (the unpatched megatron-core
fails) and sufficient: a DistributedOptimizer checkpoint round trip (both reshardable formats)
restores Adam's step and moments so the next step equals the uninterrupted one bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import outcome

FORMATS = ("fully_reshardable", "dp_reshardable")


def _model_and_optimizer():
    """A Megatron DDP linear (weight and bias) with the distributed Adam, same init each time."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_, bias=True)
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True), module=layer)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=0.1, weight_decay=0.1, use_distributed_optimizer=True), [model])
    return model, optimizer


def _model_sd(model) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {name: ShardedTensor.from_rank_offsets(f"layer.{name}", param, replica_id=0)
            for name, param in model.module.named_parameters()}


def _step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    model(torch.randn(2, 8))[0].square().sum().backward()
    model.finish_grad_sync()
    assert optimizer.step()[0]


def _steps(optimizer) -> list[float]:
    return [float(s["step"]) for o in optimizer.chained_optimizers for s in o.optimizer.state.values()]


def _roundtrip(path: str, sharding: str) -> None:
    """Save after 2 steps, load into a fresh optimizer, step once more: equal to 3 straight."""
    from megatron.core import dist_checkpointing

    metadata = {"distrib_optim_sharding_type": sharding}
    model, optimizer = _model_and_optimizer()
    for seed in (1, 2):
        _step(model, optimizer, seed)
    state = {"optimizer": optimizer.sharded_state_dict(_model_sd(model),
                                                      metadata=metadata)}
    os.makedirs(path)
    dist_checkpointing.save(state, path, sharded_strategy=("torch_dist", 1))
    saved = [p.detach().clone() for p in model.module.parameters()]
    _step(model, optimizer, 3)

    model2, optimizer2 = _model_and_optimizer()
    for p2, p in zip(model2.module.parameters(), saved):
        p2.data.copy_(p)  # the model checkpoint's part
    request = {"optimizer": optimizer2.sharded_state_dict(_model_sd(model2),
                                                         is_loading=True, metadata=metadata)}
    optimizer2.load_state_dict(dist_checkpointing.load(request, path)["optimizer"])
    assert _steps(optimizer2) == [2.0, 2.0], f"restored steps {_steps(optimizer2)}"
    _step(model2, optimizer2, 3)
    assert _steps(optimizer2) == [3.0, 3.0], f"steps after 1 more step {_steps(optimizer2)}"
    for p2, p in zip(model2.module.parameters(), model.module.parameters()):
        assert torch.equal(p2, p), f"weights differ by {float((p2 - p).abs().max()):.2e}"


def _check(rank: int, world_size: int, tmp: str) -> dict:
    from megatron.core import parallel_state

    from megatron_mosaic.training import cuda_compat, megatron_patches

    cuda_compat.apply()
    assert megatron_patches.apply() and megatron_patches.is_active()
    parallel_state.initialize_model_parallel()
    out: dict = {}
    for sharding in FORMATS:
        for patch in ("none",) + megatron_patches.PATCHES:
            path = os.path.join(tmp, f"{sharding}_{patch}")
            if patch == "none":
                out[(sharding, patch)] = outcome(_roundtrip, path, sharding)
            else:
                with megatron_patches.unpatched(patch):
                    out[(sharding, patch)] = outcome(_roundtrip, path, sharding)
    out["still_active"] = megatron_patches.is_active()
    return out


def test_each_megatron_patch_is_needed_and_sufficient(tmp_path):
    (result,) = run_distributed(_check, 1, str(tmp_path))
    assert result.pop("still_active")
    for sharding in FORMATS:
        assert result[(sharding, "none")] == "ok", f"{sharding}: {result[(sharding, 'none')]}"
    from megatron_mosaic.training.megatron_patches import PATCHES

    # How each unpatched round trip fails (the bugs the module docstring describes).
    expected = {
        ("fully_reshardable", "fresh_state_dict"): "AssertionError",
        ("dp_reshardable", "fresh_state_dict"): "AssertionError",
        ("fully_reshardable", "shared_step"): "steps after 1 more step [4.0, 4.0]",
        ("dp_reshardable", "shared_step"): "steps after 1 more step [4.0, 4.0]",
        ("fully_reshardable", "restored_step"): "KeyError: 'step'",
        ("dp_reshardable", "restored_step"): "restored steps [0.0, 0.0]",
        ("dp_reshardable", "dp_reshardable_no_grad"): "leaf Variable that requires grad",
    }
    for patch in PATCHES:
        assert any(result[(s, patch)] != "ok" for s in FORMATS), \
            f"{patch}: the round trip now works without it; drop this patch"
    for key, message in expected.items():
        assert message in result[key], f"{key}: failed for another reason: {result[key]}"


def test_patches_list():
    from megatron_mosaic.training import megatron_patches

    with pytest.raises(ValueError, match="unknown megatron_patches patch"):
        megatron_patches.revert("no_such_patch")
