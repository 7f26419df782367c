"""Export of TP=2 / PP=2 checkpoints, loading through the Auto classes, import and round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.hf.parallel_checkpoints import SPECS, load_and_forward, reference_tokens

MOSAIC = [name for name in SPECS if not name.startswith("gpt")]


def load_auto(path: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"{path}: loading left {problems}"
    return model.eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_exported_logits_equal_megatron(name, exported, parallel_checkpoints):
    model = load_auto(exported[name])
    expected_class = "LlamaForCausalLM" if name.startswith("gpt") else "MemoryMosaicForCausalLM"
    assert type(model).__name__ == expected_class
    with torch.no_grad():
        logits = model(reference_tokens(SPECS[name][0])).logits
    reference = parallel_checkpoints.logits[name]
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-4


def test_exported_directory_layout(exported):
    files = set(os.listdir(exported["v2_tp2"]))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "megatron_args.json",
            "configuration_memory_mosaic.py", "modeling_memory_mosaic.py", "layers_memory_mosaic.py",
            "memories_memory_mosaic.py", "cache_memory_mosaic.py", "scan.py",
            "retrieval.py", "layout.py", "values.py", "bandwidth.py", "features.py", "tokenizer.model",
            "tokenization_memory_mosaic.py"} <= files
    index = json.load(open(os.path.join(exported["v2_tp2"], "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= files
    config = json.load(open(os.path.join(exported["v2_tp2"], "config.json")))
    assert config["model_type"] == "memory_mosaic"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memory_mosaic.MemoryMosaicForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_memory_mosaic.MemoryMosaicConfig"
    assert json.load(open(os.path.join(exported["gpt_tp2"], "config.json")))["model_type"] == "llama"
    assert not [f for f in os.listdir(os.path.dirname(exported["v2_tp2"])) if ".partial" in f]


def test_exported_tokenizer_encodes_like_training(exported, parallel_checkpoints):
    from transformers import AutoTokenizer

    from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer

    hf = AutoTokenizer.from_pretrained(exported["v2_tp2"], trust_remote_code=True)
    ours = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", parallel_checkpoints.tokenizer_model))
    for text in ["def forward(self, x):  return x", " the cache </s> lags one step", "ünï 42"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.tokenize(text)
        assert hf.decode(ids) == ours.detokenize(ids)
    assert hf.eos_token_id == ours.eod


@pytest.mark.parametrize("name", ["v1_pp2", "v2_tp2"])
def test_cached_generation_of_exported_models_equals_recomputation(name, exported):
    model = load_auto(exported[name])
    prompt = reference_tokens(SPECS[name][0])[:, :10]
    cached = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    recomputed = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_generation_honours_the_callers_max_length(exported):
    """lm_eval's generate_until passes max_length (prompt + budget); the exported generation
    config must not override it."""
    model = load_auto(exported["v2_tp2"])
    prompt = reference_tokens(SPECS["v2_tp2"][0])[:, :10]
    out = model.generate(prompt, max_length=13, do_sample=False, eos_token_id=None)
    assert out.shape[1] == 13


def _generate_tool():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    return generate


def test_generate_tool_prints_text_continuations(exported, parallel_checkpoints, capsys):
    generate = _generate_tool()
    assert generate.main(["--load", exported["v2_tp2"], "--prompt", "def forward", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "=== def forward" in out and "--- 5 tokens" in out
    # The Megatron checkpoint itself gives the same continuation (converted in memory).
    assert generate.main(["--load", parallel_checkpoints.path("v2_tp2"), "--prompt", "def forward",
                          "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.split("\n")[1] == out.split("\n")[1]


_BLOCK_PACKAGES = """
import glob, os, sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('megatron', 'megatron_mosaic'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
import transformers.dynamic_module_utils as dynamic
from transformers import AutoModelForCausalLM
if sys.argv[2] == 'direct-only':
    dynamic.get_relative_import_files = lambda f: [
        os.path.join(os.path.dirname(f), m + '.py') for m in dynamic.get_relative_imports(f)]
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.py'))):
    dynamic.check_imports(path)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[5, 6, 7, 3, 8, 9]])
a = model.generate(ids, max_new_tokens=6, do_sample=False)
b = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
assert torch.equal(a, b)
print('OK', type(model).__module__)
"""


@pytest.mark.parametrize("loader", ["installed", "direct-only"])
def test_exported_model_needs_only_torch_and_transformers(exported, loader, tmp_path):
    """A process that cannot import megatron_mosaic: transformers' check_imports passes on every
    copied file (the Hub loader runs it on each), and the model loads and generates, with the
    installed loader and with one that copies only the modeling file's direct relative imports
    into its module cache (transformers 5.0's rule for a local directory). A fresh module cache
    each time, or files an earlier load copied would hide a missing one."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", _BLOCK_PACKAGES, exported["v1_pp2"], loader], capture_output=True,
                            text=True, timeout=120, cwd="/", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules." in result.stdout


def test_round_trip_is_exact_and_loads_at_tp2_and_pp2(exported, parallel_checkpoints, tmp_path):
    from megatron_mosaic.hf.importer import import_from_hf
    from megatron_mosaic.hf.megatron_checkpoint import read_megatron_checkpoint

    jobs = []
    for name in ["v1_pp2", "v2_tp2", "gpt_tp2"]:
        target = str(tmp_path / f"back_{name}")
        summary = import_from_hf(exported[name], target)
        assert summary["iteration"] == 7
        original = read_megatron_checkpoint(parallel_checkpoints.path(name))
        back = read_megatron_checkpoint(target)
        assert (back.iteration, back.consumed_samples) == (original.iteration, original.consumed_samples)
        assert original.tensors.keys() == back.tensors.keys()
        for key, tensor in original.tensors.items():
            assert torch.equal(tensor, back.tensors[key]), key
        for key in ("model", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "padded_vocab_size", "eod_token_id", "seq_length", "short_term_window",
                    "long_term_inference_delay", "persistent_memory_size", "disable_bias_linear"):
            assert back.args.get(key) == original.args.get(key), key
        assert back.args["tensor_model_parallel_size"] == back.args["pipeline_model_parallel_size"] == 1
        jobs.append((name, target))
    # Written at TP=PP=1, loaded by the training code at TP=2 and at PP=2: the saved model's logits.
    layouts = {"v1_pp2": (2, 1), "v2_tp2": (1, 2), "gpt_tp2": (1, 2)}  # the other layout each time
    spawn_jobs = [(name, path, SPECS[name][0], *layouts[name]) for name, path in jobs]
    results: dict = {}
    for per_rank in run_distributed(load_and_forward, 2, spawn_jobs):
        results.update(per_rank)
    for name, _ in jobs:
        logits, iteration = results[name]
        assert iteration == 7
        assert (logits - parallel_checkpoints.logits[name]).abs().max().item() < 1e-5


def test_pretrain_continues_from_an_imported_checkpoint(exported, tmp_path):
    from megatron_mosaic.hf.importer import import_from_hf
    from tests.hf.parallel_checkpoints import CONSUMED, SEQ

    checkpoint = str(tmp_path / "imported")
    import_from_hf(exported["v2_tp2"], checkpoint)
    script = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain_mosaic.py")
    argv = [sys.executable, script, "--model", "mosaic-v2", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--seq-length", str(SEQ),
            "--short-term-window", "8", "--long-term-inference-delay", "4", "--mock-data", "--vocab-size", "100",
            "--micro-batch-size", "2", "--load", checkpoint, "--train-iters", "8", "--eval-iters", "0",
            "--per-position-eval-iters", "0", "--log-interval", "1", "--no-progress-bar"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at iteration 7" in result.stdout
    assert f"iteration       8/8 | consumed samples        {CONSUMED + 2}" in result.stdout, result.stdout


def test_generation_never_emits_padded_vocabulary_ids(exported):
    """The vocabulary is padded past the tokenizer (TP/alignment); those ids have no text. Make
    them win every argmax, and generation must still pick only decodable ids."""
    from megatron_mosaic.hf.generation import generate_continuations, load_for_generation

    model, tokenizer = load_for_generation(exported["v2_tp2"])
    real, padded = len(tokenizer), model.config.vocab_size
    assert real < padded, "the fixture must have a padded vocabulary for this test to mean anything"
    config = json.load(open(os.path.join(exported["v2_tp2"], "generation_config.json")))
    assert config["suppress_tokens"] == list(range(real, padded))
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[:real] *= 0.01
        weight[real:] = 10.0 * weight[: padded - real]
    prompt = tokenizer.encode("def forward", add_special_tokens=False)
    logits = model(torch.tensor([prompt])).logits[0, -1]
    assert logits.argmax().item() >= real, "setup: a padded id should be the unconstrained argmax"
    (result,) = generate_continuations(model, tokenizer, ["def forward"], max_new_tokens=5)
    assert result.new_ids and max(result.new_ids) < real
    assert isinstance(result.text, str)


@pytest.mark.parametrize("name", ["v1_pp2", "v2_tp2", "gpt_tp2"])
def test_generate_tool_loads_megatron_checkpoints_of_every_model(name, exported, parallel_checkpoints, capsys):
    """--load on a Megatron checkpoint of each --model (converted in memory; GPT's rotary buffer
    is in no checkpoint and must be computed) continues a prompt exactly as its export does."""
    generate = _generate_tool()
    argv = ["--prompt-ids", "5 6 7 8 9", "--max-new-tokens", "4"]
    assert generate.main(["--load", parallel_checkpoints.path(name)] + argv) == 0
    from_checkpoint = capsys.readouterr().out.split("\n")
    assert from_checkpoint[0] == "=== 5 6 7 8 9" and from_checkpoint[2].startswith("--- 4 tokens"), from_checkpoint
    assert generate.main(["--load", exported[name]] + argv) == 0
    assert capsys.readouterr().out.split("\n")[1] == from_checkpoint[1]
