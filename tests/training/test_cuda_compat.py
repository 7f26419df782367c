"""Each CPU patch of training/cuda_compat.py is still needed, and sufficient.

For every patch, the megatron-core call it exists for fails on CPU with that one patch removed
and succeeds with it. When a megatron-core upgrade fixes a call site, the "fails" half of this
test fails: drop that patch.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.common import outcome

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches are CPU-only")


def _ddp_wrap() -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_, bias=False)
    DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=layer)


def _no_pipelining_schedule() -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.enums import ModelType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1))
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.model_type = ModelType.encoder_or_decoder  # read by the schedules

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            return (x * self.weight).sum()

    def forward_step(data_iterator, model):
        return model(next(data_iterator)), lambda out: (out, {"loss": out.detach()})

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([torch.ones(8)]),
                                model=[Tiny()], num_microbatches=1, seq_length=1,
                                micro_batch_size=1, forward_only=False)


def _dist_checkpoint_save(path: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tensor = torch.arange(4.0)
    state = {"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}
    dist_checkpointing.save(state, path, sharded_strategy=("torch_dist", 1))


def _linear_under_cpu_autocast() -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
    out.float().sum().backward()


def _activation_checkpoint() -> None:
    from megatron.core import tensor_parallel

    x = torch.randn(4, requires_grad=True)
    tensor_parallel.checkpoint(lambda t: t.sin() * 2, False, x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())


def _megatron_optimizer_step(use_distributed_optimizer: bool) -> None:
    """One step of Megatron's optimizer (distributed or plain) over a Megatron DDP linear."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_, bias=False)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=layer)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=1.0,
                        use_distributed_optimizer=use_distributed_optimizer), [model])
    before = layer.weight.detach().clone()
    model(torch.ones(2, 8))[0].sum().backward()
    model.finish_grad_sync()
    success, norm, _ = optimizer.step()
    assert success and norm > 0 and not torch.equal(layer.weight, before)


def _optimizer_state_gather() -> None:
    """The gather behind fully_reshardable distributed-optimizer checkpoints."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_, bias=False)
    model = DistributedDataParallel(config=config, module=layer, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.1, use_distributed_optimizer=True),
                                       [model])
    model(torch.ones(2, 8))[0].sum().backward()
    model.finish_grad_sync()
    optimizer.step()  # creates the Adam state
    state = optimizer.chained_optimizers[0].get_parameter_state_dp_zero(use_gloo_comm=False)
    assert state[0][(torch.float32, torch.float32)]["param"].numel() == 64


def _check_patches(rank: int, world_size: int, tmp: str) -> dict:
    import os

    from megatron.core import parallel_state

    from megatron_mosaic.training import cuda_compat

    assert cuda_compat.apply() and cuda_compat.is_active()
    parallel_state.initialize_model_parallel()
    cases = {
        "current_device": (_ddp_wrap,),
        "schedules": (_no_pipelining_schedule,),
        "synchronize": (_dist_checkpoint_save, os.path.join(tmp, "unpatched")),
        "linear_autocast": (_linear_under_cpu_autocast,),
        "checkpoint_rng": (_activation_checkpoint,),
        "optimizer_devices": (_megatron_optimizer_step, False),
        "optimizer_type_checks": (_megatron_optimizer_step, True),
        "optimizer_gather_device": (_optimizer_state_gather,),
    }
    for name in ("unpatched", "patched"):
        os.makedirs(os.path.join(tmp, name))
    out = {}
    for patch, (fn, *fn_args) in cases.items():
        with cuda_compat.unpatched(patch):
            without = outcome(fn, *fn_args)
        if fn is _dist_checkpoint_save:
            fn_args = [os.path.join(tmp, "patched")]
        out[patch] = (without, outcome(fn, *fn_args))
    out["still_active"] = cuda_compat.is_active()
    return out


def test_each_cpu_patch_is_needed_and_sufficient(tmp_path):
    (result,) = run_distributed(_check_patches, 1, str(tmp_path))
    assert result.pop("still_active")
    for patch, (without, with_patch) in result.items():
        assert without != "ok", f"{patch}: the unpatched call now works on CPU; drop this patch"
        expected = {"linear_autocast": "same dtype", "optimizer_type_checks": "Wrapped parameters must be"}.get(
            patch, "CUDA")
        assert expected in without, f"{patch}: failed for another reason: {without}"
        assert with_patch == "ok", f"{patch}: fails even when patched: {with_patch}"


def test_patches_are_inactive_with_cuda_or_until_applied():
    from megatron_mosaic.training import cuda_compat

    assert set(cuda_compat.PATCHES) == {"current_device", "synchronize", "schedules",
                                        "linear_autocast", "checkpoint_rng", "optimizer_devices",
                                        "optimizer_type_checks", "optimizer_gather_device"}
    with pytest.raises(ValueError, match="unknown cuda_compat patch"):
        cuda_compat.revert("no_such_patch")
