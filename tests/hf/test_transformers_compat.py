"""Every way transformers 5.x hands the decoding cache around, on the installed release.

transformers renamed the cache from ``past_key_values`` to ``cache`` within 5.x: generate()
passes it to forward under the new name, output classes declare the new field, and the old
name logs a deprecation warning on every use. These tests run each calling convention (forward
with ``cache=`` and with ``past_key_values=``, both at once, generate with and without a given
cache), in the package and in an exported directory's remote code, and fail on any deprecation
warning: the next rename fails here, not in a user's run. tools/test_transformers.sh runs them
against another transformers release.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import fields

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from megatron_mosaic.hf import MosaicCache
from megatron_mosaic.hf.modeling_memory_mosaic import CACHE_FIELD, output_cache
from tests.hf.test_modeling import prompts, tiny_model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_deprecation_warnings():
    """Fail if transformers logs or warns about a deprecation inside the block.

    transformers logs each deprecation once per process (``warning_once``): the once-cache is
    cleared first, so a warning an earlier test already triggered is seen again here.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    handler = _Records()
    # The library root logger does not propagate; remote code logs under transformers_modules.
    loggers = [hf_logging.get_logger("transformers"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    logged = [m for m in handler.messages if "deprecat" in m.lower()]
    warned = [f"{w.category.__name__}: {w.message}" for w in caught
              if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not logged + warned, f"deprecation warnings: {logged + warned}"


def chunked_logits(model, ids: torch.Tensor, cache_name: str) -> tuple[torch.Tensor, MosaicCache]:
    """Logits of ``ids`` fed in chunks, the cache handed back under ``cache_name`` each time."""
    cache, pieces, start = None, [], 0
    with torch.no_grad():
        for size in (5, 1, 3, 1):
            out = model(ids[:, start:start + size], use_cache=True, **{cache_name: cache})
            cache, start = output_cache(out), start + size
            pieces.append(out.logits)
    assert start == ids.shape[1]
    return torch.cat(pieces, dim=1), cache


def test_output_classes_declare_the_field_the_model_fills():
    for output_cls in (CausalLMOutputWithPast, BaseModelOutputWithPast):
        assert CACHE_FIELD in {f.name for f in fields(output_cls)}
    model = tiny_model(2)
    with torch.no_grad():
        out = model(prompts(2, 6), use_cache=True)
        base = model.model(prompts(2, 6), use_cache=True)
    for output in (out, base):
        assert isinstance(output[CACHE_FIELD], MosaicCache)
        assert output_cache(output) is output[CACHE_FIELD]
    assert isinstance(out.to_tuple()[1], MosaicCache)  # logits, cache: positional consumers agree


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@pytest.mark.parametrize("version", [1, 2])
def test_forward_takes_the_cache_under_either_name(version, cache_name):
    model = tiny_model(version)
    ids = prompts(2, 10)
    with torch.no_grad():
        full = model(ids).logits
    with no_deprecation_warnings():
        logits, cache = chunked_logits(model, ids, cache_name)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


def test_the_cache_under_both_names_is_rejected():
    model = tiny_model(2)
    ids = prompts(2, 6)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        for module in (model, model.model):
            with pytest.raises(ValueError, match="either cache= or past_key_values="):
                module(ids[:, :1], cache=cache, past_key_values=cache)
    assert cache.get_seq_length() == 6  # the refused call changed nothing


@pytest.mark.parametrize("version", [1, 2])
def test_generate_with_a_given_cache_fills_it(version):
    """A MosaicCache handed to generate() under the installed release's name is the one used."""
    model = tiny_model(version)
    ids = prompts(2, 8)
    cache = MosaicCache(model.config.num_hidden_layers)
    with no_deprecation_warnings():
        given = model.generate(ids, max_new_tokens=6, do_sample=False, **{CACHE_FIELD: cache})
    recomputed = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(given, recomputed)
    assert cache.get_seq_length() == 8 + 6 - 1  # the last token is returned, never fed back


@pytest.mark.parametrize("version", [1, 2])
def test_generate_logs_no_deprecation_warning(version):
    model = tiny_model(version)
    ids = prompts(2, 8)
    with no_deprecation_warnings():
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
        beams = model.generate(ids[:1], max_new_tokens=5, num_beams=2, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=5)
        detailed = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert greedy.shape == sampled.shape == (2, 13) and beams.shape == (1, 13)
    assert torch.equal(detailed.sequences, greedy)
    assert isinstance(detailed[CACHE_FIELD], MosaicCache)


def _export_code_and_weights(model, target: str) -> None:
    """What export_to_hf writes for a Mosaic model, from an HF model instead of a checkpoint."""
    from megatron_mosaic.hf.export import AUTO_MAP, copy_model_code

    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(target)
    copy_model_code(target)


@pytest.mark.parametrize("version", [1, 2])
def test_exported_directory_code_under_every_convention(version, tmp_path):
    """The exported modeling file (remote code, its own copy of the cache-name logic) behaves
    like the package's: both forward names, the refusal of both, generate, no warnings."""
    from transformers import AutoModelForCausalLM

    target = str(tmp_path / f"hf_v{version}")
    source = tiny_model(version)
    _export_code_and_weights(source, target)
    model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules.")
    remote = sys.modules[type(model).__module__]
    assert remote.CACHE_FIELD == CACHE_FIELD
    ids = prompts(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        # Loading kept every saved weight (transformers 5.0 runs _init_weights after loading).
        torch.testing.assert_close(full, source(ids).logits, rtol=1e-5, atol=1e-5)
    with no_deprecation_warnings():
        for cache_name in ("cache", "past_key_values"):
            cache, pieces = None, []
            with torch.no_grad():
                for chunk in (ids[:, :7], ids[:, 7:]):
                    out = model(chunk, use_cache=True, **{cache_name: cache})
                    cache = remote.output_cache(out)
                    pieces.append(out.logits)
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], cache=cache, past_key_values=cache)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))


def test_exported_memory_files_are_direct_imports_of_the_modeling_file():
    """transformers 5.0 copies only a remote-code file's direct relative imports: a memory file
    reached only through another (precision.py through scan.py) would be missing at load."""
    from megatron_mosaic.hf.export import memory_code_files

    files = memory_code_files()  # raises ConversionError naming any indirect one
    assert {"scan.py", "retrieval.py", "layout.py"} <= set(files)
