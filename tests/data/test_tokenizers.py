"""Each tokenizer type against an independent reference, exact round trips, and clear errors."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import regex

from megatron_mosaic.data.tokenizers import NO_PAD_ID, TokenizerError, TokenizerSpec, build_tokenizer


def _spec(tokenizer_type, **files) -> TokenizerSpec:
    return TokenizerSpec(tokenizer_type=tokenizer_type, **files)


@pytest.fixture(scope="module")
def tokenizers(sp_model, gpt2_files, hf_dir):
    return {
        "SentencePieceTokenizer": build_tokenizer(_spec("SentencePieceTokenizer", tokenizer_model=sp_model)),
        "GPT2BPETokenizer": build_tokenizer(_spec("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])),
        "HuggingFaceTokenizer": build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_dir)),
    }


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"])
def test_round_trip_and_special_ids(tokenizers, documents, kind):
    tok = tokenizers[kind]
    for doc in documents:
        ids = tok.tokenize(doc)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids  # tokenize never adds document markers
        assert tok.detokenize(ids) == doc
    assert 0 <= tok.eod < tok.vocab_size
    assert tok.pad == NO_PAD_ID or (0 <= tok.pad < tok.vocab_size and tok.pad != tok.eod)
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it into dataset cache names
    copy = pickle.loads(pickle.dumps(tok))  # DataLoader workers / spawned ranks rebuild it
    assert type(copy) is type(tok) and copy.tokenize(documents[0]) == tok.tokenize(documents[0])


def test_sentencepiece_matches_sentencepiece_library(tokenizers, sp_model, documents):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = tokenizers["SentencePieceTokenizer"]
    assert tok.vocab_size == reference.get_piece_size()
    assert tok.eod == reference.eos_id() == 2
    for doc in documents:
        assert tok.tokenize(doc) == reference.encode(doc)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _reference_gpt2_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """Textbook GPT-2 BPE: regex pre-split, bytes to characters, merge the best-ranked pair until none."""
    byte_map = _bytes_to_unicode()
    ids = []
    for word in _GPT2_PATTERN.findall(text):
        parts = [byte_map[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == math.inf:
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):
                if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        ids.extend(vocab[p] for p in parts)
    return ids


def test_gpt2_bpe_matches_textbook_reference(tokenizers, gpt2_files, documents):
    with open(gpt2_files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(gpt2_files[1], encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines() if line and not line.startswith("#version")]
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    tok = tokenizers["GPT2BPETokenizer"]
    for doc in documents[:20] + ["Hello  world's 123 4567 don't\n\n\ttabs  ", "<|endoftext|>"]:
        assert tok.tokenize(doc) == _reference_gpt2_bpe(doc, vocab, ranks)
    # A literal "<|endoftext|>" in text is ordinary bytes: text cannot fake a document boundary.
    assert tok.tokenize("a <|endoftext|> b").count(tok.eod) == 0
    assert tok.eod == vocab["<|endoftext|>"]


def test_huggingface_matches_tokenizers_library(tokenizers, hf_dir, documents):
    import os

    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    tok = tokenizers["HuggingFaceTokenizer"]
    assert tok.eod == reference.token_to_id("</s>")
    assert tok.pad == reference.token_to_id("<pad>")
    for doc in documents:
        assert tok.tokenize(doc) == reference.encode(doc, add_special_tokens=False).ids


def test_missing_and_bad_tokenizer_files(tmp_path, gpt2_files):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=f"--tokenizer-model {missing}: no such file"):
        build_tokenizer(_spec("SentencePieceTokenizer", tokenizer_model=missing))
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer(_spec("SentencePieceTokenizer"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer(_spec("SentencePieceTokenizer", tokenizer_model=str(garbage)))
    with pytest.raises(TokenizerError, match=f"--merge-file {tmp_path / 'm.txt'}: no such file"):
        build_tokenizer(_spec("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=str(tmp_path / "m.txt")))
    with pytest.raises(TokenizerError, match="no such directory"):
        build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf")))
    with pytest.raises(TokenizerError, match="expected one of"):
        build_tokenizer(_spec("BertWordPieceCase"))


def test_sentencepiece_model_without_eos_is_refused(tmp_path, documents):
    import sentencepiece

    prefix = str(tmp_path / "noeos")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(documents), model_prefix=prefix,
                                             vocab_size=120, eos_id=-1, minloglevel=2)
    with pytest.raises(TokenizerError, match="no EOS piece"):
        build_tokenizer(_spec("SentencePieceTokenizer", tokenizer_model=prefix + ".model"))


def test_null_tokenizer_ids_are_the_text():
    tok = build_tokenizer(_spec("NullTokenizer", vocab_size=100))
    assert (tok.vocab_size, tok.eod, tok.pad) == (101, 100, NO_PAD_ID)  # Megatron-LM: EOD = N
    # Any whitespace separates ids: a .txt document may hold one id per line.
    assert tok.tokenize("0 5\n99\t 7  3 ") == [0, 5, 99, 7, 3]
    assert tok.detokenize([0, 5, 99, 7, 100]) == "0 5 99 7 100"
    assert tok.files == {}
    assert json.loads(json.dumps(tok.unique_identifiers)) == {"tokenizer_type": "NullTokenizer", "vocab_size": 100}
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.vocab_size == 101 and copy.tokenize("1 2") == [1, 2]


def test_null_tokenizer_agrees_with_megatron_core():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as Reference

    reference, tok = Reference(100), build_tokenizer(_spec("NullTokenizer", vocab_size=100))
    assert (tok.vocab_size, tok.eod) == (reference.vocab_size, reference.eod)
    text = "3 1 4 1 5 9 2 6 0 99"
    assert tok.tokenize(text) == reference.text_to_ids(text)
    assert tok.detokenize(tok.tokenize(text)) == reference.ids_to_text(reference.text_to_ids(text)) == text


@pytest.mark.parametrize("text, message, offset", [
    ("1 x 2", "'x' is not a token id", 2),
    ("1 2 -3", "'-3' is not a token id", 4),
    ("4.0", "'4.0' is not a token id", 0),
    ("7 1e3", "'1e3' is not a token id", 2),
    ("1 \u0663", "'\u0663' is not a token id", 2),  # an Arabic-Indic digit: int() would take it
    ("5 100", "token id 100 is outside [0, 100)", 2),  # N is the EOD id, never text
    ("12345678901234567890", "token id 12345678901234567890 is outside [0, 100)", 0),
])
def test_null_tokenizer_refuses_words_that_are_not_ids(text, message, offset):
    from megatron_mosaic.data.tokenizers import InvalidTokenIdError

    tok = build_tokenizer(_spec("NullTokenizer", vocab_size=100))
    with pytest.raises(InvalidTokenIdError, match=regex.escape(message)) as info:
        tok.tokenize(text)
    assert info.value.offset == offset


def test_null_tokenizer_needs_a_vocab_size():
    with pytest.raises(TokenizerError, match="NullTokenizer needs --vocab-size N"):
        build_tokenizer(_spec("NullTokenizer"))
    with pytest.raises(TokenizerError, match="--vocab-size 0: NullTokenizer needs at least 1"):
        build_tokenizer(_spec("NullTokenizer", vocab_size=0))


def test_vocab_size_belongs_to_the_spec_only_for_null_tokenizer():
    import argparse

    # pretrain_mosaic.py's --vocab-size also sizes --mock-data; another kind must not carry it.
    ns = argparse.Namespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model="m", vocab_size=64)
    assert TokenizerSpec.from_args(ns).vocab_size is None
    ns.tokenizer_type = "NullTokenizer"
    assert TokenizerSpec.from_args(ns).vocab_size == 64


def test_tokenizer_json_only_directory_needs_eod_token(hf_json_only_dir, documents):
    from tokenizers import Tokenizer

    from tests.data.conftest import JSON_ONLY_EOD

    with pytest.raises(TokenizerError, match="has no eos_token, which is the EOD token; name its end-of-document "
                                             "token with --eod-token TOKEN"):
        build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_json_only_dir))
    tok = build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_json_only_dir, eod_token=JSON_ONLY_EOD))
    reference = Tokenizer.from_file(f"{hf_json_only_dir}/tokenizer.json")
    assert tok.eod == reference.token_to_id(JSON_ONLY_EOD) == 1
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    for doc in documents:
        ids = tok.tokenize(doc)
        assert ids == reference.encode(doc, add_special_tokens=False).ids
        assert tok.eod not in ids and tok.detokenize(ids) == doc
    assert tok.unique_identifiers["eod_token"] == JSON_ONLY_EOD
    copy = pickle.loads(pickle.dumps(tok))  # rebuilt from the spec: the same EOD in every worker
    assert copy.eod == tok.eod


def test_eod_token_overrides_the_eos_and_must_be_in_the_vocabulary(hf_dir, hf_json_only_dir):
    from tokenizers import Tokenizer

    tok = build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_dir, eod_token="<s>"))
    assert tok.eod == Tokenizer.from_file(f"{hf_dir}/tokenizer.json").token_to_id("<s>")
    with pytest.raises(TokenizerError, match=regex.escape(f"--eod-token '</eos>': not in the vocabulary of "
                                                          f"--tokenizer-model {hf_json_only_dir}")):
        build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_json_only_dir, eod_token="</eos>"))


def test_eod_token_is_refused_for_kinds_with_a_fixed_eod(sp_model):
    with pytest.raises(TokenizerError, match="--eod-token applies to --tokenizer-type HuggingFaceTokenizer only, "
                                             "not SentencePieceTokenizer"):
        build_tokenizer(_spec("SentencePieceTokenizer", tokenizer_model=sp_model, eod_token="</s>"))


def test_a_pad_equal_to_the_eod_is_dropped(hf_dir):
    """GPTDataset zeroes pad tokens in its batches: a pad that is also EOD would erase every
    document boundary, so the tokenizer reports no pad instead."""
    tok = build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_dir, eod_token="<pad>"))
    assert tok.eod == build_tokenizer(_spec("HuggingFaceTokenizer", tokenizer_model=hf_dir)).pad
    assert tok.pad == NO_PAD_ID
