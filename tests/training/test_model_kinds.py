"""The model registry (training/model_kinds.py): one entry per --model choice, whose facts match
the model the builder makes."""

from __future__ import annotations

import pytest

from megatron_mosaic.training.arguments import build_parser
from megatron_mosaic.training.model_kinds import KINDS
from tests.training.common import tiny_args


def test_every_model_choice_has_a_registry_entry():
    (action,) = [a for a in build_parser()._actions if a.dest == "model"]
    assert tuple(action.choices) == tuple(KINDS) == ("mosaic-v1", "mosaic-v2", "gpt")
    assert all(name == kind.name for name, kind in KINDS.items())


@pytest.mark.parametrize("name", list(KINDS))
def test_registry_facts_match_the_built_model(name):
    from megatron_mosaic.training.initialize import single_rank_megatron
    from megatron_mosaic.training.model_builder import build_model

    kind = KINDS[name]
    args = tiny_args(name, [], 1)
    args.padded_vocab_size = 128
    with single_rank_megatron(seed=1):
        (model,) = build_model(args, device="cpu")
    config = model.config
    assert getattr(config, "mosaic_version", None) == kind.mosaic_version
    assert bool(config.gated_linear_unit) == kind.swiglu
    assert any(".mlp." in n for n, _ in model.named_parameters()) == kind.swiglu
    assert model.share_embeddings_and_output_weights == kind.tied_output
    assert (model.output_layer.weight is None) == kind.tied_output
    assert config.normalization == kind.normalization
    assert (kind.position_embedding == "rope") == (getattr(model, "position_embedding_type", "none") == "rope")
