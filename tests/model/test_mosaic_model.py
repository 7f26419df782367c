"""Single-process tests of the Megatron-Core integration (TP=PP=1, tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_mosaic.memory import SequenceLayout
from megatron_mosaic.model import (
    MemoryContext,
    MosaicConfig,
    MosaicModel,
    build_gpt_baseline,
    config_from_dict,
    config_to_dict,
    get_mosaic_layer_local_spec,
    get_mosaic_layer_te_spec,
    gpt_baseline_config,
    mosaic_config_from_dict,
    sample_long_term_delay,
)
from tests.model import naive_mosaic
from tests.model.helpers import (
    BATCH, EOD, SEQ, VOCAB, logical_parameters, packed_tokens, randomize_per_head_, single_rank_megatron,
    tiny_config, tiny_gpt_config,
)
from megatron_mosaic.model.fused_projection import logical_tensors


@pytest.fixture(autouse=True, scope="module")
def megatron_single_rank():
    with single_rank_megatron():
        yield


def build(version: int, seed: int = 0, **overrides) -> MosaicModel:
    torch.manual_seed(seed)
    model = MosaicModel(tiny_config(version, **overrides), VOCAB, eod_token_id=EOD)
    randomize_per_head_(model, torch.Generator().manual_seed(seed + 1))
    return model


@pytest.mark.parametrize("version", [1, 2])
def test_forward_backward_finite(version):
    model = build(version)
    tokens = packed_tokens(torch.Generator().manual_seed(0))
    loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=3)
    assert loss.shape == (BATCH, SEQ) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (BATCH, SEQ, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_naive_reference(version, packed):
    """One block's output vs. an independent float64 (T, T) re-computation from its weights."""
    model = build(version, seed=3)
    gen = torch.Generator().manual_seed(4)
    tokens = packed_tokens(gen)
    layout = SequenceLayout.from_tokens(tokens, EOD) if packed else SequenceLayout.contiguous(BATCH, SEQ)
    delay = 3
    cfg = model.config
    for layer in model.decoder.layers:  # both layers: v2 inits depend on the layer index
        if version == 1:  # push one head past the official key-scale clamp (pow·10κ > 5)
            with torch.no_grad():
                layer.persistent_memory.key_extractor.key_scale[0] = 0.3
                layer.contextual_memory.key_extractor.key_scale[1] = 0.6
        x = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)
        out, ctx = layer(x, context=None, packed_seq_params=MemoryContext(layout, delay))
        assert ctx is None
        weights = logical_tensors(layer, {k: v for k, v in layer.state_dict().items() if torch.is_tensor(v)})
        xb, doc = x.transpose(0, 1), layout.doc_starts
        if version == 1:
            want = naive_mosaic.v1_block(xb, weights, cfg.num_attention_heads, doc)
        else:
            want = naive_mosaic.v2_block(xb, weights, cfg.num_attention_heads, doc, delay, cfg.short_term_window)
        torch.testing.assert_close(out.transpose(0, 1).double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["v1", "v2", "gpt"])
def test_layers_share_the_micro_batch_masks(kind, monkeypatch):
    """Document masks, resets and visible counts are built once per micro-batch (by the first
    layer, on the layout every layer shares), and the losses and gradients are exactly those of
    building them again in every layer."""
    from megatron_mosaic.memory import runs

    def run(cached: bool):
        torch.manual_seed(0)
        model = (build_gpt_baseline(tiny_gpt_config(), VOCAB, eod_token_id=EOD) if kind == "gpt"
                 else build(int(kind[1])))
        if not cached:
            monkeypatch.setattr(SequenceLayout, "derived", lambda self, key, make: make())
        built = []
        real = runs._document_block_masks
        monkeypatch.setattr(runs, "_document_block_masks", lambda *a: built.append(a[1:4]) or real(*a))
        tokens = packed_tokens(torch.Generator().manual_seed(2))
        loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=3)
        loss.mean().backward()
        monkeypatch.undo()
        return loss, [p.grad for p in model.parameters()], built

    loss, grads, built = run(cached=True)
    loss_again, grads_again, rebuilt = run(cached=False)
    rules = {"v1": 1, "v2": 2, "gpt": 1}[kind]  # masking rules per layer (v2: short and long term)
    assert len(built) == rules and len(set(built)) == rules
    assert len(rebuilt) == 2 * rules  # two layers, each building its own
    assert torch.equal(loss, loss_again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))


@pytest.mark.parametrize("kind", ["v1", "v2", "gpt"])
def test_document_masking_isolates_documents(kind):
    """Outputs of one document do not move when another document of the packed row changes."""
    if kind == "gpt":
        torch.manual_seed(0)
        model = build_gpt_baseline(tiny_gpt_config(), VOCAB, eod_token_id=EOD)
    else:
        model = build(int(kind[1]))
    model.eval()
    tokens = packed_tokens(torch.Generator().manual_seed(5))
    changed = tokens.clone()
    changed[0, 6:11] = (changed[0, 6:11] + 7 - EOD) % (VOCAB - EOD - 1) + EOD + 1  # row 0, middle document
    changed[1, 0:8] = (changed[1, 0:8] + 11 - EOD) % (VOCAB - EOD - 1) + EOD + 1  # row 1, first document
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[0, :6], b[0, :6], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[0, 12:], b[0, 12:], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1, 9:], b[1, 9:], rtol=0, atol=1e-6)
    assert (a[0, 6:11] - b[0, 6:11]).abs().max() > 1e-3  # the edit itself is visible
    assert (a[1, :8] - b[1, :8]).abs().max() > 1e-3


def test_v2_delay_rules():
    model = build(2, long_term_inference_delay=3)
    tokens = packed_tokens(torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="long_term_delay is required"):
        model(tokens, labels=tokens)
    model.eval()
    with torch.no_grad():
        default, explicit, other = model(tokens), model(tokens, long_term_delay=3), model(tokens, long_term_delay=5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert (default - other).abs().max() > 1e-4


@pytest.mark.parametrize("version", [1, 2])
def test_sharded_state_dict_covers_every_parameter(version):
    model = build(version)
    sharded = model.sharded_state_dict()
    tensors = [v for v in sharded.values() if isinstance(v, ShardedTensor)]
    assert all(isinstance(v, (ShardedTensor, ShardedObject, ShardedTensorFactory)) for v in sharded.values())
    covered = {id(v.data) for v in sharded.values() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not missing, missing
    by_key = {t.key: t for t in tensors}
    head_keys = (
        ["decoder.layers.contextual_memory.key_extractor.leak", "decoder.layers.persistent_memory.memory_keys"]
        if version == 1 else ["decoder.layers.memory.long_term.bandwidth_theta1", "decoder.layers.memory.short_term.value_extractor.mix"]
    )
    for key in head_keys:  # layer axis prepended by TransformerBlock, heads on the next axis
        t = by_key[key]
        assert t.global_shape[0] == model.config.num_layers
        assert t.global_shape[1] == model.config.num_attention_heads
    for name, p in model.named_parameters():
        is_head_param = name.split(".")[-1] in {
            "leak", "key_scale", "mix", "value_scale", "memory_keys", "memory_values", "output_scale",
            "bandwidth_theta0", "bandwidth_theta1", "bandwidth_theta_alpha",
        }
        if is_head_param:
            assert p.tensor_model_parallel and p.partition_dim == 0, name


@pytest.mark.parametrize("version", [1, 2])
def test_te_spec_raises_clear_error(version):
    with pytest.raises(ImportError, match="transformer-engine"):
        get_mosaic_layer_te_spec(version)
    with pytest.raises(ValueError, match="version"):
        get_mosaic_layer_local_spec(3)


def test_long_term_delay_sampler():
    draws = [sample_long_term_delay(1234, step, 64, 256) for step in range(400)]
    assert draws == [sample_long_term_delay(1234, step, 64, 256) for step in range(400)]
    assert min(draws) == 64 and max(draws) == 256  # both ends reachable over 400 steps
    assert len(set(draws)) > 100
    assert draws != [sample_long_term_delay(1235, step, 64, 256) for step in range(400)]
    assert sample_long_term_delay(0, 7, 5, 5) == 5
    with pytest.raises(ValueError, match="low <= high"):
        sample_long_term_delay(0, 0, 10, 9)
    with pytest.raises(ValueError, match="step"):
        sample_long_term_delay(0, -1, 1, 2)
    with pytest.raises(TypeError, match="seed"):
        sample_long_term_delay(1.5, 0, 1, 2)


def test_gpt_baseline_runs_and_is_llama_style():
    torch.manual_seed(0)
    model = build_gpt_baseline(tiny_gpt_config(), VOCAB, eod_token_id=EOD)
    tokens = packed_tokens(torch.Generator().manual_seed(7))
    loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=100)
    assert loss.shape == (BATCH, SEQ) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    names = dict(model.named_parameters())
    assert "output_layer.weight" in names  # untied
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape[0] == 2 * model.config.ffn_hidden_size
    assert not any(n.endswith("bias") for n in names)
    with pytest.raises(ValueError, match="normalization"):
        build_gpt_baseline(gpt_baseline_config(normalization="LayerNorm", num_layers=1, hidden_size=8,
                                               num_attention_heads=2), VOCAB)


@pytest.mark.parametrize("packed", [False, True])
def test_gpt_sdpa_attention_matches_causal_softmax(packed):
    """The core attention against an explicit softmax(qkᵀ/√d + causal [+ document] mask) v."""
    torch.manual_seed(0)
    model = build_gpt_baseline(tiny_gpt_config(), VOCAB)
    attn = model.decoder.layers[0].self_attention.core_attention
    q, k, v = (torch.randn(SEQ, BATCH, 4, 8) for _ in range(3))
    layout = SequenceLayout.from_tokens(packed_tokens(torch.Generator().manual_seed(8)), EOD)
    got = attn(q, k, v, None, packed_seq_params=MemoryContext(layout, 1) if packed else None)
    if packed:  # with attention dropout the document mask goes to SDPA explicitly: same result
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # the CPU tracker training uses
        attn.dropout_p = 1e-12
        dense = attn(q, k, v, None, packed_seq_params=MemoryContext(layout, 1))
        attn.dropout_p = 0.0
        torch.testing.assert_close(dense, got, rtol=1e-5, atol=1e-6)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(8)
    hidden = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    if packed:
        starts = layout.doc_starts
        hidden = hidden | (starts[:, :, None] != starts[:, None, :]).unsqueeze(1)
    want = torch.einsum("bhst,tbhd->sbhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(got, want.reshape(SEQ, BATCH, 32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_config_round_trip_and_validation(version):
    cfg = tiny_config(version, long_term_inference_delay=7, hidden_dropout=0.1, init_seed=9)
    d = cfg.to_dict()
    again = mosaic_config_from_dict(d)
    assert again.to_dict() == d
    for field in ("mosaic_version", "persistent_memory_size", "add_bias_linear", "normalization",
                  "gated_linear_unit", "ffn_hidden_size", "long_term_delay_range", "hidden_dropout", "init_seed"):
        assert getattr(again, field) == getattr(cfg, field), field
    assert again.activation_func is cfg.activation_func
    assert mosaic_config_from_dict(d, tensor_model_parallel_size=2).tensor_model_parallel_size == 2
    gpt = tiny_gpt_config(init_seed=9)
    gpt_again = config_from_dict(config_to_dict(gpt))
    assert type(gpt_again).__name__ == "GPTBaselineConfig" and gpt_again.activation_func is F.silu
    assert gpt_again.init_seed == 9
    with pytest.raises(ValueError, match="unknown"):
        mosaic_config_from_dict({**d, "no_such_field": 1})


def test_config_defaults_and_errors():
    v1 = tiny_config(1, persistent_memory_size=0)
    assert v1.persistent_memory_size == round(3.5 * 32) and v1.add_bias_linear and v1.normalization == "LayerNorm"
    v2 = tiny_config(2)
    assert not v2.add_bias_linear and v2.normalization == "RMSNorm" and v2.gated_linear_unit
    assert v2.activation_func is F.silu and v2.ffn_hidden_size == 96
    for bad, match in [
        (dict(mosaic_version=3), "mosaic_version"),
        (dict(mosaic_version=2, add_bias_linear=True), "add_bias_linear"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(mosaic_version=2, long_term_delay_range=(9, 4)), "long_term_delay_range"),
        (dict(hidden_size=30), "divisible"),
    ]:
        with pytest.raises(ValueError, match=match):
            MosaicConfig(**{**dict(num_layers=1, hidden_size=32, num_attention_heads=4), **bad})


def test_v1_init_follows_official():
    torch.manual_seed(0)
    model = MosaicModel(tiny_config(1, hidden_size=64, num_layers=3), VOCAB)
    layer = model.decoder.layers[1]
    cm = layer.contextual_memory
    assert abs(logical_parameters(cm)["key_extractor.linear_key.weight"].std().item() - 0.02) < 0.002
    assert abs(cm.linear_proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.001
    assert torch.count_nonzero(cm.linear_proj.bias) == 0
    torch.testing.assert_close(cm.key_extractor.leak.data, torch.linspace(0.5, 5, 4) / 10)
    torch.testing.assert_close(cm.key_extractor.key_scale.data, torch.full((4,), 0.1))
    torch.testing.assert_close(cm.value_extractor.value_scale.data, torch.full((4,), -0.05))
    assert ((cm.value_extractor.mix >= 0) & (cm.value_extractor.mix <= 1)).all()
    slots = layer.persistent_memory.memory_keys
    assert abs(slots.std().item() - 1 / math.sqrt(16)) < 0.02
    assert abs(model.embedding.word_embeddings.weight.std().item() - 0.02) < 0.002


def test_v2_init_is_truncated_normal_per_layer():
    torch.manual_seed(0)
    d = 64
    model = MosaicModel(tiny_config(2, hidden_size=d, num_layers=3), VOCAB)
    for l, layer in enumerate(model.decoder.layers):
        sigma = 1 / math.sqrt(2 * d * (l + 1))
        sigma2 = 1 / math.sqrt(2 * model.config.ffn_hidden_size * (l + 1))
        st = layer.memory.short_term
        parts = logical_parameters(layer.memory)
        weights = [parts["short_term.key_extractor.linear_key.weight"], parts["long_term.value_extractor.linear_value.weight"],
                   layer.memory.linear_proj.weight, layer.mlp.linear_fc1.weight]
        for w in weights:
            # std of N(0, σ²) truncated at ±3σ is 0.9866 σ
            assert abs(w.std().item() / (0.9866 * sigma) - 1) < 0.06
            assert w.abs().max() <= 3 * sigma + 1e-7
        fc2 = layer.mlp.linear_fc2.weight
        assert abs(fc2.std().item() / (0.9866 * sigma2) - 1) < 0.06 and fc2.abs().max() <= 3 * sigma2 + 1e-7
        torch.testing.assert_close(st.bandwidth_theta0.data, torch.full((4,), 1.5))
        torch.testing.assert_close(st.bandwidth_theta_alpha.data, torch.full((4,), 1 / 3))
        torch.testing.assert_close(st.value_extractor.value_scale.data, torch.zeros(4))
    for w in (model.embedding.word_embeddings.weight, model.output_layer.weight):
        assert abs(w.std().item() / (0.9866 / math.sqrt(2 * d)) - 1) < 0.06
