"""Exported tokenizers give the training tokenizer's ids, for every tokenizer type."""

from __future__ import annotations

import os

import pytest

from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer
from megatron_mosaic.hf.export import build_hf_tokenizer, save_hf_tokenizer
from tests.hf.helpers import SPM_TEXT, train_tiny_sentencepiece

TEXTS = ["def forward(self, x):  return x", "  two  spaces", "héllo <|endoftext|> </s> world", "1234 ünï"]


def _train_bpe(directory: str) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line for line in open(SPM_TEXT, encoding="utf-8").read().splitlines() if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    os.makedirs(directory)
    tokenizer.model.save(directory)
    return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.join(directory, "vocab.json"),
            "merge_file": os.path.join(directory, "merges.txt")}


def _check_round_trip(args: dict, target: str) -> None:
    from transformers import AutoTokenizer

    ours = build_tokenizer(TokenizerSpec(args["tokenizer_type"], args.get("tokenizer_model"),
                                         args.get("vocab_file"), args.get("merge_file")))
    save_hf_tokenizer(build_hf_tokenizer(args), target)
    hf = AutoTokenizer.from_pretrained(target, trust_remote_code=True)
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert hf.encode(text, add_special_tokens=False) == ids, (args["tokenizer_type"], text)
        assert hf.decode(ids) == ours.detokenize(ids)
    assert hf.eos_token_id == ours.eod


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"])
def test_exported_tokenizer_matches_training(kind, tmp_path):
    if kind == "SentencePieceTokenizer":
        args = {"tokenizer_type": kind, "tokenizer_model": train_tiny_sentencepiece(str(tmp_path / "spm"))}
    elif kind == "GPT2BPETokenizer":
        args = _train_bpe(str(tmp_path / "bpe"))
    else:  # an HF tokenizer directory used for training is exported as itself
        source = str(tmp_path / "hf_source")
        save_hf_tokenizer(build_hf_tokenizer(_train_bpe(str(tmp_path / "bpe"))), source)
        args = {"tokenizer_type": kind, "tokenizer_model": source}
    _check_round_trip(args, str(tmp_path / "exported"))


def test_checkpoint_without_tokenizer_exports_none():
    assert build_hf_tokenizer({"tokenizer_type": None}) is None
