"""Shared fixtures: a small varied corpus and tokenizer files of every supported type, built here."""

from __future__ import annotations

import json
import os
import random

import pytest

_WORDS = ("king queen lord lady sword crown night day love death honour grief mercy fool "
          "ghost castle storm sea friend enemy letter ring battle peace heaven earth").split()
_EXTRAS = ["Mr. Smith", "St. Paul's", "e.g. this", "naïve café", "Ærø", "漢字", "—", "🙂", "3.14", "1,000"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Documents with several sentences, newlines, runs of spaces, tabs and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 7)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
            if rng.random() < 0.4:
                words.insert(rng.randrange(len(words)), rng.choice(_EXTRAS))
            sentence = " ".join(words)
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", "."])
            sentences.append(sentence)
        text = ""
        for sentence in sentences:
            text += sentence + rng.choice([" ", "  ", "\n", "\n\n", " \t"])
        docs.append(text.rstrip() if rng.random() < 0.7 else "  " + text)
    return docs


def make_id_documents(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Pre-tokenized documents for NullTokenizer: each a short random pattern of ids repeated, so
    a model can learn them in context; the extreme ids 0 and ``vocab_size - 1`` occur."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        pattern = [rng.randrange(vocab_size) for _ in range(rng.randint(2, 9))]
        docs.append((pattern * 40)[:rng.randint(5, 120)])
    docs[0][0], docs[-1][-1] = 0, vocab_size - 1
    return docs


def id_text(ids: list[int], seed: int = 0) -> str:
    """The ids as NullTokenizer text, separated by varied whitespace (spaces, tabs, newlines)."""
    rng = random.Random(seed)
    separators = [" ", " ", "  ", "\t", "\n"]
    return "".join(str(i) + rng.choice(separators) for i in ids).rstrip()


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(60, seed=1)


def write_jsonl(path: str, docs: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, documents) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("corpus") / "docs.jsonl"), documents)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, documents) -> str:
    from megatron_mosaic.data.tokenizer_training import train_sentencepiece

    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    return train_sentencepiece(documents * 3, prefix, vocab_size=400, model_type="bpe")


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory, documents) -> tuple[str, str]:
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(out))
    return str(out / "vocab.json"), str(out / "merges.txt")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, documents) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    out = str(tmp_path_factory.mktemp("hf") / "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


# The end-of-text entry of the tokenizer.json-only directory, which declares no eos_token.
JSON_ONLY_EOD = "<|end|>"


@pytest.fixture(scope="session")
def hf_json_only_dir(tmp_path_factory, documents) -> str:
    """A directory holding only tokenizer.json (as `tokenizers` saves it): no tokenizer_config.json,
    so nothing says which entry is the EOS; ``JSON_ONLY_EOD`` is a special token of its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", JSON_ONLY_EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    out = tmp_path_factory.mktemp("hf_json_only")
    tok.save(str(out / "tokenizer.json"))
    assert os.listdir(out) == ["tokenizer.json"]
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_args(sp_model, gpt2_files, hf_dir) -> dict[str, list[str]]:
    """Command-line tokenizer flags for each supported type."""
    return {
        "SentencePieceTokenizer": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model],
        "GPT2BPETokenizer": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0],
                             "--merge-file", gpt2_files[1]],
        "HuggingFaceTokenizer": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir],
    }


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))
