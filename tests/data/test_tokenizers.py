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
