"""Export and generation of checkpoints trained with NullTokenizer (ids only, no tokenizer to
export; the real vocabulary is N + 1) and with --eod-token (a tokenizer.json-only directory,
which declares no eos_token)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.hf.helpers import SPM_TEXT
from tests.training.common import TINY

NULL_N = 40  # NullTokenizer ids 0..39, EOD 40: 41 real ids, padded to 128
JSON_ONLY_EOD = "<|end|>"


def _tiny(extra: list[str]) -> list[str]:
    """TINY (2 layers, 2 iterations) with its own data/tokenizer flags instead of --mock-data --vocab-size 64."""
    argv = list(TINY)
    i = argv.index("--mock-data")
    del argv[i:i + 3]
    argv[argv.index("--num-layers") + 1] = "2"
    return argv + ["--model", "mosaic-v2", "--train-iters", "2", "--mock-data"] + extra


def _train(rank: int, world_size: int, root: str, runs: dict) -> dict:
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.pretrain import pretrain

    out = {}
    for name, extra in runs.items():
        args = parse_args(_tiny(extra + ["--save", os.path.join(root, name)]), world_size)
        pretrain(args)
        out[name] = {"eod_token_id": args.eod_token_id, "padded_vocab_size": args.padded_vocab_size}
    return out


def _json_only_tokenizer(directory: str) -> str:
    """A directory holding only tokenizer.json: nothing names its EOS; JSON_ONLY_EOD is a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line for line in open(SPM_TEXT, encoding="utf-8").read().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", JSON_ONLY_EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Two 2-iteration mosaic-v2 checkpoints saved by pretrain (one spawned process)."""
    root = str(tmp_path_factory.mktemp("tokenizer_kinds"))
    json_only = _json_only_tokenizer(os.path.join(root, "json_only"))
    runs = {"null": ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_N)],
            "eod": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", json_only,
                    "--eod-token", JSON_ONLY_EOD]}
    info = run_distributed(_train, 1, root, runs)[0]
    assert info["null"] == {"eod_token_id": NULL_N, "padded_vocab_size": 128}
    return {"root": root, "json_only": json_only, "info": info,
            **{name: os.path.join(root, name) for name in runs}}


def _tool(name: str):
    tools = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
    path = os.path.join(tools, "checkpoint") if name == "convert_to_hf" else tools
    sys.path.insert(0, os.path.abspath(path))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _convert(load: str, output: str, *extra: str) -> None:
    assert _tool("convert_to_hf").main(["--load", load, "--output", output, *extra]) == 0


def test_null_tokenizer_checkpoint_exports_ids_only(checkpoints, tmp_path, capsys):
    """convert_to_hf.py without --no-tokenizer: no tokenizer files, padded ids suppressed past N + 1."""
    out = str(tmp_path / "hf")
    _convert(checkpoints["null"], out)
    assert "tokenizer: none" in capsys.readouterr().out
    files = os.listdir(out)
    assert not [f for f in files if f.startswith(("tokenizer", "special_tokens"))], files
    config = json.load(open(os.path.join(out, "generation_config.json")))
    assert config["eos_token_id"] == NULL_N
    assert config["suppress_tokens"] == list(range(NULL_N + 1, 128))
    # A NullTokenizer checkpoint has no tokenizer file to replace: one clear error line.
    assert _tool("convert_to_hf").main(["--load", checkpoints["null"], "--output", str(tmp_path / "o"),
                                        "--tokenizer-model", checkpoints["json_only"]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with NullTokenizer" in err, err


def test_generate_tool_on_null_tokenizer_checkpoint(checkpoints, tmp_path, capsys):
    generate = _tool("generate")
    argv = ["--prompt-ids", "1 2 3 4 5", "--max-new-tokens", "4"]
    assert generate.main(["--load", checkpoints["null"]] + argv) == 0
    from_checkpoint = capsys.readouterr().out.split("\n")
    assert from_checkpoint[0] == "=== 1 2 3 4 5" and from_checkpoint[2].startswith("--- "), from_checkpoint
    assert all(0 <= int(i) <= NULL_N for i in from_checkpoint[1].split()), from_checkpoint  # may stop at EOD
    out = str(tmp_path / "hf")
    _convert(checkpoints["null"], out)
    capsys.readouterr()
    assert generate.main(["--load", out] + argv) == 0
    assert capsys.readouterr().out.split("\n")[1] == from_checkpoint[1]
    # Text means nothing to an ids-only model: one line, before any model is loaded.
    for load in (checkpoints["null"], out):
        assert generate.main(["--load", load, "--prompt", "Once upon a time"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert "trained with NullTokenizer" in captured.err and "--prompt-ids" in captured.err


def _boost_padded_rows(model, real: int) -> None:
    """Make the padded ids (>= real) win every unconstrained argmax."""
    with torch.no_grad():
        weight = model.lm_head.weight
        padded = weight.shape[0]
        weight[:real] *= 0.01
        weight[real:] = 10.0 * weight[: padded - real]


def test_null_tokenizer_model_never_emits_padded_ids(checkpoints, tmp_path):
    from megatron_mosaic.hf.generation import generate_continuations, load_for_generation

    out = str(tmp_path / "hf")
    _convert(checkpoints["null"], out, "--no-tokenizer")
    # An export made before suppress_tokens was written for NullTokenizer: megatron_args.json says.
    old = str(tmp_path / "hf_old")
    shutil.copytree(out, old)
    config_path = os.path.join(old, "generation_config.json")
    config = json.load(open(config_path))
    assert config.pop("suppress_tokens") == list(range(NULL_N + 1, 128))
    json.dump(config, open(config_path, "w"))

    prompt = [1, 2, 3, 4, 5]
    for source in (checkpoints["null"], out, old):
        model, tokenizer = load_for_generation(source)
        assert tokenizer is None
        _boost_padded_rows(model, NULL_N + 1)
        logits = model(torch.tensor([prompt])).logits[0, -1]
        assert logits.argmax().item() > NULL_N, "setup: a padded id should be the unconstrained argmax"
        (result,) = generate_continuations(model, None, [prompt], max_new_tokens=5)
        assert result.new_ids and max(result.new_ids) <= NULL_N, (source, result.new_ids)  # EOD (N) may end it


def test_eod_token_checkpoint_exports_its_eos(checkpoints, tmp_path):
    """Trained with --eod-token on a tokenizer.json-only directory: the exported tokenizer's eos is
    that token, the same id as generation_config.eos_token_id and training's EOD."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    eod = Tokenizer.from_file(os.path.join(checkpoints["json_only"], "tokenizer.json")).token_to_id(JSON_ONLY_EOD)
    assert checkpoints["info"]["eod"]["eod_token_id"] == eod
    out = str(tmp_path / "hf")
    _convert(checkpoints["eod"], out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == JSON_ONLY_EOD and tokenizer.eos_token_id == eod
    assert GenerationConfig.from_pretrained(out).eos_token_id == eod

    from megatron_mosaic.hf.generation import load_for_generation

    _, in_memory = load_for_generation(checkpoints["eod"])
    assert in_memory.eos_token_id == eod


def test_ids_only_vocabulary_from_checkpoint_arguments():
    from megatron_mosaic.hf.conversion import ConversionError
    from megatron_mosaic.hf.export import build_hf_tokenizer, null_tokenizer_vocab_size

    null = {"tokenizer_type": "NullTokenizer", "vocab_size": 7, "eod_token_id": 7}
    assert build_hf_tokenizer(null) is None and null_tokenizer_vocab_size(null) == 8
    with pytest.raises(ConversionError, match="NullTokenizer"):
        build_hf_tokenizer(null, "/some/tokenizer")
    # --mock-data --vocab-size N without --tokenizer-type trains on NullTokenizer over N.
    assert null_tokenizer_vocab_size({"tokenizer_type": None, "mock_data": True, "vocab_size": 64,
                                      "eod_token_id": 64}) == 65
    assert null_tokenizer_vocab_size({"tokenizer_type": None, "mock_data": True, "vocab_size": 100,
                                      "eod_token_id": 3}) is None
    assert null_tokenizer_vocab_size({"tokenizer_type": "HuggingFaceTokenizer", "eod_token_id": 5}) is None
