"""The HF model's decoding cache against full recomputation (random tiny models, no Megatron).

The slow reference everywhere is the model run over the whole prefix with no cache; the cached
path (lagged pairs, carried key recurrences, window trimming, delays, document starts) must
reproduce it token for token.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.hf import MemoryMosaicConfig, MemoryMosaicForCausalLM, MosaicCache
from megatron_mosaic.hf.modeling_memory_mosaic import build_step_layout, output_cache
from megatron_mosaic.memory import SequenceLayout

EOD = 3
VOCAB = 61


def tiny_model(version: int, seed: int = 0, **overrides) -> MemoryMosaicForCausalLM:
    """A random model whose window (5) and delay (3) are crossed within a few tokens."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=24, num_attention_heads=3, num_hidden_layers=2, mosaic_version=version,
                  ffn_hidden_size=40, persistent_memory_size=12, short_term_window=5, long_term_inference_delay=3,
                  eod_token_id=EOD, eos_token_id=None, pad_token_id=0, add_bias_linear=version == 1)
    fields.update(overrides)
    model = MemoryMosaicForCausalLM(MemoryMosaicConfig(**fields)).eval()
    with torch.no_grad():  # spread the per-head scalars so a head mix-up cannot go unnoticed
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=gen)
    ids[0, length // 3] = EOD  # a document boundary inside the prompt of row 0
    return ids


@pytest.mark.parametrize("version", [1, 2])
def test_chunked_forward_with_cache_equals_full_forward(version):
    model = tiny_model(version)
    ids = prompts(2, 17)
    ids[1, 11] = EOD  # and one inside a later chunk of row 1
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = None, [], 0
        for size in (4, 1, 1, 5, 1, 3, 2):  # prefill, single tokens, multi-token chunks
            out = model(ids[:, start:start + size], cache=cache, use_cache=True)
            cache, start = output_cache(out), start + size
            pieces.append(out.logits)
    assert start == ids.shape[1] and cache.get_seq_length() == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_cached_greedy_generation_equals_recomputation(version):
    model = tiny_model(version)
    ids = prompts(2, 9)
    cached = model.generate(ids, max_new_tokens=24, do_sample=False)
    recomputed = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    assert cached.shape == (2, 33)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("version", [1, 2])
def test_generated_eod_starts_a_new_document(version):
    # Make EOD the most likely token after a few steps: the cache must reset memories there.
    model = tiny_model(version, seed=3)
    with torch.no_grad():
        model.lm_head.weight[EOD] += 2.0 * model.lm_head.weight[5]
        if version == 1:
            model.tie_weights()
    ids = torch.full((1, 6), 5)
    cached = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
    recomputed = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_beam_search_reorders_the_cache():
    model = tiny_model(2)
    ids = prompts(1, 7)
    cached = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    recomputed = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("version", [1, 2])
def test_left_padded_rows_generate_as_if_alone(version):
    model = tiny_model(version)
    long, short = prompts(1, 10, seed=4)[0], prompts(1, 6, seed=5)[0]
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0], batch[1, 4:] = long, short
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    alone_long = model.generate(long[None], max_new_tokens=12, do_sample=False)
    alone_short = model.generate(short[None], max_new_tokens=12, do_sample=False)
    assert torch.equal(together[0, 10:], alone_long[0, 10:])
    assert torch.equal(together[1, 10:], alone_short[0, 6:])


@pytest.mark.parametrize("version", [1, 2])
def test_decoding_step_runs_only_the_new_token(version):
    """Per generated token every projection sees one position: no re-run of the prefix."""
    model = tiny_model(version)
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[1]))
             for name, m in model.named_modules() if name.endswith("key_extractor.linear_key")]
    per_forward = len(hooks)
    ids = prompts(1, 12)
    model.generate(ids, max_new_tokens=6, do_sample=False)
    for h in hooks:
        h.remove()
    assert seen[:per_forward] == [12] * per_forward  # the prompt, once
    assert seen[per_forward:] == [1] * (5 * per_forward)  # then one position per step


def test_cache_keeps_the_window_and_grows_the_long_term_store():
    model = tiny_model(2)
    window = model.config.short_term_window
    with torch.no_grad():
        out = model(prompts(2, 11), use_cache=True)
        cache = output_cache(out)
        for step in range(4):
            cache = output_cache(model(torch.full((2, 1), 7), cache=cache, use_cache=True))
    memories = cache.layers[0].memories
    # h - 1 pairs reachable by the next query: h - 2 filed + the pending one.
    assert memories["short_term"].num_pairs == window - 2
    assert memories["long_term"].num_pairs == 11 + 4 - 1  # every filed pair (the last is pending)
    assert memories["short_term"].positions[0].tolist() == list(range(15 - window + 1, 14))
    assert isinstance(cache, MosaicCache) and cache.get_seq_length() == 15


def test_step_layout_matches_sequence_layout_from_tokens():
    ids = prompts(3, 20)
    ids[1, 0] = EOD
    ids[2, 5:8] = EOD
    layout, plain, ended = build_step_layout(ids, None, None, EOD)
    reference = SequenceLayout.from_tokens(ids, EOD)
    assert torch.equal(layout.positions, reference.positions)
    assert torch.equal(layout.doc_starts, reference.doc_starts)
    assert not plain and torch.equal(ended, ids[:, -1] == EOD)
    single, plain, _ = build_step_layout(torch.full((2, 5), 9), None, None, EOD)
    assert plain and single.single_document


def test_bad_attention_masks_and_caches_are_rejected():
    model = tiny_model(2)
    ids = prompts(2, 6)
    holes = torch.ones_like(ids)
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="only left padding"):
        model(ids, attention_mask=holes)
    with pytest.raises(TypeError, match="MosaicCache"):
        model(ids, cache=object())
    cache = output_cache(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(ids[:1, :1], cache=cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
