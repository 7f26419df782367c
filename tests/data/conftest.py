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
