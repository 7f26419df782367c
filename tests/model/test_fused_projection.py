"""Each memory's projections are one column-parallel GEMM padded to FP8-legal widths
(model/fused_projection.py): the pad stays zero and inert, the parts are drawn as the separate
linears were, and checkpoints keep (and old ones load in) the separate layout."""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch.distributed.checkpoint import FileSystemReader

from megatron_mosaic.model import MosaicModel
from megatron_mosaic.model.extractors import MemoryLinears
from megatron_mosaic.model.fused_projection import (
    FP8_MULTIPLE, FusedProjection, Part, fused_tensors, logical_tensors,
)
from megatron_mosaic.model.init_rng import init_rng
from tests.model.helpers import EOD, VOCAB, packed_tokens, single_rank_megatron, tiny_config
from tests.model.old_layout import make_fixture

OLD = os.path.join(os.path.dirname(__file__), "old_layout")


@pytest.fixture(autouse=True, scope="module")
def megatron_single_rank():
    with single_rank_megatron():
        yield


def _projections(model) -> list[FusedProjection]:
    return [m for m in model.modules() if isinstance(m, FusedProjection)]


@pytest.mark.parametrize("version", [1, 2])
def test_one_gemm_per_memory_with_fp8_legal_width(version):
    model = MosaicModel(tiny_config(version), VOCAB, eod_token_id=EOD)
    fused = _projections(model)
    # v1: contextual + persistent memory; v2: short- and long-term memory in one GEMM
    assert len(fused) == (2 if version == 1 else 1) * model.config.num_layers
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear)]
    assert len(linears) == 2 * model.config.num_layers + 1  # the fused ones (+ v2's SwiGLU fc1), output layer
    d, heads = model.config.hidden_size, model.config.num_attention_heads
    want = {1: [2 * d, d], 2: [2 * (2 * d + 2 * heads)]}[version]
    for m in fused:
        weight = m.linear.weight  # TP-split on its rows: counted by every TP rank in grad norms
        assert weight.tensor_model_parallel and weight.partition_dim == 0 and weight.allreduce
        assert m.linear.weight.shape[0] % FP8_MULTIPLE == 0 and m.linear.weight.shape[1] == d
        assert sum(m.widths) in want and m.linear.weight.shape[0] - sum(m.widths) < FP8_MULTIPLE


def test_parts_are_drawn_as_the_separate_linears_were():
    """Under one seed, the fused weight's parts equal separate ColumnParallelLinears built in the
    same order: the per-part init (distribution and draws) is that of the old layout."""
    config = tiny_config(2, init_seed=5)
    init = torch.nn.init.normal_
    parts = [("key_extractor.linear_key", 8), ("key_extractor.linear_gate", 1)]
    with init_rng(5, "x"):
        fused = FusedProjection(config, MemoryLinears(), [Part(n, w) for n, w in parts], init, False)
    with init_rng(5, "x"):
        separate = [ColumnParallelLinear(32, 4 * w, config=config, init_method=init, bias=False, gather_output=False)
                    for _, w in parts]
    for piece, linear in zip(fused.split(fused.linear.weight), separate):
        torch.testing.assert_close(piece, linear.weight, rtol=0, atol=0)
    assert fused.linear.weight.shape == (48, 32) and not fused.linear.weight[36:].any()


def _tensor_shapes(path: str) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in meta.items() if isinstance(v, TensorStorageMetadata) and not k.startswith("rng")}


@pytest.mark.parametrize("model_name", make_fixture.MODELS)
def test_checkpoint_of_separate_projections_loads_and_is_still_the_format(model_name, tmp_path):
    """tests/model/old_layout was written before the fusion (make_fixture.py): it loads into the
    fused model with the same logits, and a new checkpoint stores the same tensors."""
    from megatron_mosaic.training.arguments import args_to_dict
    from megatron_mosaic.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_mosaic.training.model_builder import build_model

    args = make_fixture.run_args(model_name)
    chunks = build_model(args)
    old = os.path.join(OLD, model_name)
    load_checkpoint(old, chunks, load_rng=False)
    chunks[0].eval()
    with torch.no_grad():
        logits = chunks[0](make_fixture.tokens())
    # One GEMM instead of four sums in another order: fp32 rounding (measured <= 2.4e-6 absolute
    # on logits of size ~1); a misplaced part would move them by O(1).
    torch.testing.assert_close(logits, torch.load(os.path.join(OLD, "logits.pt"))[model_name], rtol=1e-5, atol=1e-5)
    for m in _projections(chunks[0]):
        assert not m.linear.weight[sum(m.widths):].any()  # the pad came back as zeros
    save_checkpoint(str(tmp_path), 1, chunks, args=args_to_dict(args), save_rng=False)
    assert _tensor_shapes(str(tmp_path / "iter_0000001")) == _tensor_shapes(os.path.join(old, "iter_0000001"))


def test_pad_rows_get_zero_gradients_and_stay_zero_under_adamw():
    torch.manual_seed(0)
    model = MosaicModel(tiny_config(2, num_layers=1, num_attention_heads=2), VOCAB, eod_token_id=EOD)
    fused = _projections(model)
    assert all(m.pad > 0 for m in fused)  # 2 memories x (2·32 + 2·2) = 136 channels, padded to 144
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    tokens = packed_tokens(torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens, labels=tokens.roll(-1, 1), long_term_delay=3).mean().backward()
        for m in fused:
            assert m.linear.weight.grad[sum(m.widths):].abs().max() == 0
            assert m.linear.weight.grad[: sum(m.widths)].abs().max() > 0
        optimizer.step()
    for m in fused:
        assert not m.linear.weight[sum(m.widths):].any()


def test_logical_view_round_trips():
    model = MosaicModel(tiny_config(1), VOCAB, eod_token_id=EOD)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    logical = logical_tensors(model, state)
    assert "decoder.layers.0.contextual_memory.value_extractor.linear_value.bias" in logical
    assert not any(".projection." in k for k in logical)
    back = fused_tensors(model, logical)
    assert set(back) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    del logical["decoder.layers.1.persistent_memory.key_extractor.linear_key.weight"]
    fused_tensors(model, logical)  # a whole fused tensor absent: left absent
    del logical["decoder.layers.0.contextual_memory.key_extractor.linear_key.weight"]
    with pytest.raises(KeyError, match="linear_key.weight"):
        fused_tensors(model, logical)


def test_throughput_flops_count_no_pad_rows():
    """--log-throughput's matrix weights (training/flops.py): the pad rows are computed but do no
    useful work, so a v2 layer counts 2 memories x (W_φ, W_v: d x d; W_g, W_λ: H x d), W_o, SwiGLU."""
    from megatron_mosaic.training.flops import matmul_weights

    model = MosaicModel(tiny_config(2, num_attention_heads=2), VOCAB, eod_token_id=EOD)
    assert all(m.pad > 0 for m in _projections(model))
    c = model.config
    d, h, f = c.hidden_size, c.num_attention_heads, c.ffn_hidden_size
    per_layer = 2 * (2 * d * d + 2 * h * d) + 2 * d * d + 3 * d * f
    assert matmul_weights([model]) == c.num_layers * per_layer + VOCAB * d  # + the untied output layer
