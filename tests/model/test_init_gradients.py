"""No parameter is dead at initialisation: one backward pass on a random batch reaches every
trainable parameter of v1, v2 and the GPT baseline with a non-zero gradient.

A parameter whose gradient is exactly zero at its initial value never moves under AdamW (zero
moments, decoupled decay of an exact 0 stays 0), so it would silently stay at its init for the
whole run; the v2 value scale did (a_h = exp(min(|θ|, 15)), θ = 0, d|θ|/dθ = 0 at 0).
"""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.model import MosaicModel, build_gpt_baseline
from tests.model.helpers import EOD, VOCAB, packed_tokens, single_rank_megatron, tiny_config, tiny_gpt_config

# Long enough that the v2 long-term memory (delay 3) and every window see stored pairs.
LONG_TERM_DELAY = 3


def _model(kind: str) -> torch.nn.Module:
    if kind == "gpt":
        return build_gpt_baseline(tiny_gpt_config(), VOCAB, eod_token_id=EOD)
    return MosaicModel(tiny_config(1 if kind == "mosaic-v1" else 2), VOCAB, eod_token_id=EOD)


def _dead(name: str, param: torch.nn.Parameter) -> bool:
    """No gradient, or an exactly zero one. Per-head vectors must move in every head: a single
    head stuck at its init is as dead as a whole tensor."""
    if param.grad is None:
        return True
    per_head = getattr(param, "tensor_model_parallel", False) and param.dim() == 1 and "bias" not in name
    grad = param.grad.abs()
    return bool((grad == 0).any()) if per_head else bool(grad.max() == 0)


@pytest.mark.parametrize("kind", ["mosaic-v1", "mosaic-v2", "gpt"])
def test_every_parameter_gets_a_gradient_at_init(kind):
    with single_rank_megatron(seed=0):
        model = _model(kind)
        tokens = packed_tokens(torch.Generator().manual_seed(1))
        loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=LONG_TERM_DELAY)
        loss.sum().backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dead = [n for n, p in trainable if _dead(n, p)]
    assert trainable, kind
    assert not dead, f"{kind}: parameters with no or an exactly zero gradient at init: {dead}"
