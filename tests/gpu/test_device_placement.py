"""Every tensor of v1, v2 and the GPT baseline lives on the parameters' device.

The models are built by ``build_model`` (the training path) straight onto the ``meta`` device
and run forward and backward under ``OnlyOn("meta")`` (tests/gpu/device_guard.py): a buffer or
an intermediate forced onto the CPU fails here as it would fail on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.memory import SequenceLayout
from megatron_mosaic.training.model_builder import build_model, pad_vocab_size
from tests.gpu.device_guard import OnlyOn
from tests.model.helpers import EOD, packed_tokens, single_rank_megatron
from tests.training.common import tiny_args

MODELS = ["mosaic-v1", "mosaic-v2", "gpt"]


def _meta_batch(packed: bool):
    """Tokens and their layout on meta; the layout's per-batch facts are computed here, on the
    CPU, once per micro-batch, as the training loop does before the layers run."""
    tokens = packed_tokens(torch.Generator().manual_seed(1), batch=2, seq=32)
    if not packed:
        tokens = tokens.masked_fill(tokens == EOD, EOD + 1)
    layout = SequenceLayout.from_tokens(tokens, EOD)
    layout.single_document, layout.uniform_documents  # noqa: B018  (compute and cache the facts)
    return tokens.to("meta"), layout.to("meta")


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("model", MODELS)
def test_forward_backward_never_leave_the_parameters_device(model, packed):
    with single_rank_megatron(seed=0):
        args = tiny_args(model, ["--attention-dropout", "0", "--hidden-dropout", "0"], 1)
        args.padded_vocab_size = pad_vocab_size(args.vocab_size, 1)
        args.eod_token_id = EOD
        (chunk,) = build_model(args, device="meta")
        assert {p.device.type for p in chunk.parameters()} == {"meta"}
        assert {b.device.type for b in chunk.buffers()} <= {"meta"}
        tokens, layout = _meta_batch(packed)
        with OnlyOn("meta"):
            loss = chunk(tokens, labels=tokens, layout=layout, long_term_delay=3)
            loss.sum().backward()
        assert loss.shape == tokens.shape and loss.is_meta
        assert all(p.grad is not None and p.grad.is_meta for p in chunk.parameters() if p.requires_grad)


def test_the_guard_catches_a_tensor_forced_onto_the_cpu():
    weight = torch.ones(4, 4, device="meta")
    with OnlyOn("meta"), pytest.raises(RuntimeError, match="on cpu"):
        weight + torch.arange(4.0)  # no device=: a CPU tensor meeting a model tensor
