"""pretrain_mosaic.py with NullTokenizer and with a tokenizer.json-only directory + --eod-token:
argument checks, and short training runs whose checkpoints rebuild the same tokenizer."""

from __future__ import annotations

import math
import os

import pytest

from megatron_mosaic.data import preprocess
from megatron_mosaic.training.arguments import ArgumentError, build_parser, validate_args
from tests.data.conftest import JSON_ONLY_EOD, id_text, make_id_documents, write_jsonl
from tests.distributed import run_distributed
from tests.training.common import TINY

NULL_VOCAB = 128  # N: the vocabulary is N + 1 = 129 ids, padded to 256 (128 if EOD were forgotten)


def _without_mock_data(argv: list[str]) -> list[str]:
    """``argv`` less --mock-data and its --vocab-size (which would name the NullTokenizer's N)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--mock-data":
            i += 1
        elif argv[i] == "--vocab-size":
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# The tiny model of the training tests, reading a preprocessed dataset instead of mock data.
TRAIN = _without_mock_data(TINY) + ["--model", "mosaic-v2", "--train-iters", "3", "--split", "90,10,0",
                                    "--eval-interval", "3", "--eval-iters", "1"]


def _validate(argv: list[str]):
    return validate_args(build_parser().parse_args(TRAIN + argv), 1)


def _error(argv: list[str]) -> str:
    with pytest.raises(ArgumentError) as info:
        _validate(argv)
    return str(info.value)


def test_tokenizer_arguments_are_checked_before_any_work(sp_model, hf_json_only_dir):
    data = ["--data-path", "unused"]
    assert _error(data + ["--tokenizer-type", "NullTokenizer"]) == (
        "--tokenizer-type NullTokenizer needs --vocab-size N (token ids are 0..N-1; N is the EOD id)")
    assert _error(data + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "0"]) == "--vocab-size must be >= 1, got 0"
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    assert "--tokenizer-type SentencePieceTokenizer takes its vocabulary from its files" in _error(
        data + sp + ["--vocab-size", "100"])
    assert _error(data + sp + ["--eod-token", "</s>"]) == "--eod-token applies to --tokenizer-type HuggingFaceTokenizer only"
    # The tokenizer is loaded during validation: its errors are argument errors too.
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_json_only_dir]
    assert "name its end-of-document token with --eod-token TOKEN" in _error(data + hf)
    assert _error(data + hf + ["--eod-token", "<eos>"]) == (
        f"--eod-token '<eos>': not in the vocabulary of --tokenizer-model {hf_json_only_dir}")
    assert _error(data + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/nonexistent.model"]) == (
        "--tokenizer-model /nonexistent.model: no such file")
    args = _validate(data + hf + ["--eod-token", JSON_ONLY_EOD])
    assert args.eod_token == JSON_ONLY_EOD


def test_cli_bad_eod_token_is_one_line_exit_2(capsys, hf_json_only_dir):
    from megatron_mosaic.training.pretrain import main

    with pytest.raises(SystemExit) as info:
        main(TRAIN + ["--data-path", "unused", "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", hf_json_only_dir, "--eod-token", "<eos>"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"pretrain_mosaic.py: error: --eod-token '<eos>': not in the vocabulary "
                                       f"of --tokenizer-model {hf_json_only_dir}\n")


def test_mock_data_takes_the_null_tokenizer_vocabulary():
    from megatron_mosaic.training.data import build_data

    args = validate_args(build_parser().parse_args(
        TRAIN + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]), 1)
    data = build_data(args)
    assert (data.vocab_size, data.eod_token_id) == (11, 10)
    # --mock-data is Megatron's MockGPTDataset: an epoch is millions of samples; 200 suffice.
    tokens = [int(t) for i in range(200) for t in data.train[i]["tokens"]]
    assert max(tokens) == 10 and 10 in tokens  # documents end with EOD = N


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, documents, hf_json_only_dir):
    """A NullTokenizer dataset and a tokenizer.json-only one, both preprocessed with --append-eod."""
    root = tmp_path_factory.mktemp("pretrain_tokenizers")
    ids = write_jsonl(str(root / "ids.jsonl"), [id_text(d, seed=i) for i, d in
                                                 enumerate(make_id_documents(200, NULL_VOCAB, seed=5))])
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB)]
    assert preprocess.main(["--input", ids, "--output-prefix", str(root / "ids"), "--append-eod"] + null) == 0
    text = write_jsonl(str(root / "text.jsonl"), documents * 3)
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_json_only_dir,
          "--eod-token", JSON_ONLY_EOD]
    assert preprocess.main(["--input", text, "--output-prefix", str(root / "text"), "--append-eod"] + hf) == 0
    return {"root": str(root),
            "null": (str(root / "ids_text_document"), null),
            "hf": (str(root / "text_text_document"), hf)}


def _train_and_reload(rank: int, world_size: int, root: str, runs: dict) -> dict:
    """Train each dataset for 3 iterations, save, and rebuild the tokenizer from the checkpoint."""
    from megatron_mosaic.data.tokenizers import build_tokenizer
    from megatron_mosaic.training.arguments import args_from_dict, parse_args
    from megatron_mosaic.training.checkpointing import read_checkpoint_args
    from megatron_mosaic.training.pretrain import pretrain

    out = {}
    for name, (prefix, tokenizer) in runs.items():
        save = os.path.join(root, f"ckpt-{name}")
        args = parse_args(TRAIN + ["--data-path", prefix, "--save", save,
                                   "--data-cache-path", os.path.join(root, "cache")] + tokenizer, world_size)
        summary = pretrain(args)
        saved = read_checkpoint_args(save)
        rebuilt = build_tokenizer(args_from_dict(saved))
        out[name] = {"losses": summary["losses"], "valid_loss": summary["valid_loss"],
                     "padded_vocab_size": args.padded_vocab_size, "eod_token_id": args.eod_token_id,
                     "saved": {k: saved.get(k) for k in ("tokenizer_type", "vocab_size", "eod_token",
                                                         "padded_vocab_size", "eod_token_id")},
                     "rebuilt": (type(rebuilt).__name__, rebuilt.vocab_size, rebuilt.eod)}
    return out


def test_training_on_null_tokenizer_and_json_only_tokenizer_data(datasets, hf_json_only_dir):
    from tokenizers import Tokenizer

    runs = {name: datasets[name] for name in ("null", "hf")}
    result = run_distributed(_train_and_reload, 1, datasets["root"], runs)[0]
    for name, r in result.items():
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"] + [r["valid_loss"]]), (name, r)

    null = result["null"]
    assert null["eod_token_id"] == NULL_VOCAB and null["padded_vocab_size"] == 256
    assert null["saved"] == {"tokenizer_type": "NullTokenizer", "vocab_size": NULL_VOCAB, "eod_token": None,
                             "padded_vocab_size": 256, "eod_token_id": NULL_VOCAB}
    assert null["rebuilt"] == ("NullTokenizer", NULL_VOCAB + 1, NULL_VOCAB)

    reference = Tokenizer.from_file(f"{hf_json_only_dir}/tokenizer.json")
    eod, vocab = reference.token_to_id(JSON_ONLY_EOD), reference.get_vocab_size(with_added_tokens=True)
    hf = result["hf"]
    assert hf["eod_token_id"] == eod and hf["padded_vocab_size"] == 512
    assert hf["saved"]["tokenizer_type"] == "HuggingFaceTokenizer" and hf["saved"]["eod_token"] == JSON_ONLY_EOD
    assert hf["rebuilt"] == ("HuggingFaceTokenizer", vocab, eod)
