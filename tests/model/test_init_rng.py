"""Initial weights come from per-part streams of ``config.init_seed`` (model.init_rng), one
process: they ignore the ambient generators and leave them untouched, and the GPT baseline's
embedding / output layer are what their own constructors draw from those streams. The layout
checks (PP, virtual PP against one process) are in tests/training/test_parallel_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_mosaic.model import MosaicModel, build_gpt_baseline
from megatron_mosaic.model.init_rng import EMBEDDING, OUTPUT_LAYER, init_rng
from tests.model.helpers import EOD, VOCAB, single_rank_megatron, tiny_config, tiny_gpt_config

KINDS = ["mosaic-v1", "mosaic-v2", "gpt"]


@pytest.fixture(autouse=True, scope="module")
def megatron_single_rank():
    with single_rank_megatron():
        yield


def _model(kind: str, init_seed) -> torch.nn.Module:
    if kind == "gpt":
        return build_gpt_baseline(tiny_gpt_config(init_seed=init_seed), VOCAB, eod_token_id=EOD)
    return MosaicModel(tiny_config(1 if kind == "mosaic-v1" else 2, init_seed=init_seed), VOCAB, eod_token_id=EOD)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_init_seed_alone_decides_the_weights(kind):
    torch.manual_seed(1)
    first = _weights(_model(kind, init_seed=7))
    torch.manual_seed(2)
    before = torch.get_rng_state()
    second = _weights(_model(kind, init_seed=7))
    assert torch.equal(torch.get_rng_state(), before), f"{kind}: building the model moved the ambient RNG"
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{kind}: {name} depends on the ambient RNG"
    other = _weights(_model(kind, init_seed=8))
    random = [n for n in first if first[n].dim() >= 2]  # 1-D: norms, biases, per-head constants
    assert random and all(not torch.equal(first[n], other[n]) for n in random), f"{kind}: init_seed is ignored"


def test_without_init_seed_the_ambient_rng_decides():
    torch.manual_seed(3)
    first = _weights(_model("mosaic-v2", init_seed=None))
    torch.manual_seed(3)
    again = _weights(_model("mosaic-v2", init_seed=None))
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_gpt_embedding_and_output_layer_are_their_constructors_draws():
    """GPTModel builds its embedding and output layer itself, so GPTBaseline draws them again:
    the result must be exactly what the Megatron constructors draw from the same streams (the
    same distributions, and what MosaicModel, which builds them inside the streams, gets)."""
    config = tiny_gpt_config(init_seed=7)
    model = build_gpt_baseline(config, VOCAB, eod_token_id=EOD)
    with init_rng(7, EMBEDDING):
        embedding = LanguageModelEmbedding(config=config, vocab_size=VOCAB, max_sequence_length=0,
                                           position_embedding_type="none")
    with init_rng(7, OUTPUT_LAYER):
        output = ColumnParallelLinear(config.hidden_size, VOCAB, config=config, init_method=config.init_method,
                                      bias=False, gather_output=False)
    assert torch.equal(model.embedding.word_embeddings.weight, embedding.word_embeddings.weight)
    assert torch.equal(model.output_layer.weight, output.weight)
