"""tools/preprocess_data.py: text -> .bin/.idx -> IndexedDataset -> text, and determinism."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_mosaic.data import encoder, preprocess
from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer
from tests.data.conftest import JSON_ONLY_EOD, id_text, make_id_documents, write_jsonl

TYPES = ["SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"]


def run(argv: list[str]) -> int:
    return preprocess.main([str(a) for a in argv])


def read_dataset(prefix: str) -> list[list[np.ndarray]]:
    """Documents as lists of sequences (sentences), read with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    # Copies: the arrays IndexedDataset returns are views of an mmap it closes when collected.
    return [[np.array(ds[i]) for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]


def spec_of(args: list[str]) -> TokenizerSpec:
    parser = preprocess.get_parser()
    ns = parser.parse_args(args + ["--input", "x", "--output-prefix", "y"])
    return TokenizerSpec.from_args(ns)


@pytest.mark.parametrize("kind", TYPES)
def test_round_trip_every_tokenizer(tmp_path, corpus_jsonl, documents, tokenizer_args, kind):
    prefix = tmp_path / "out"
    assert run(["--input", corpus_jsonl, "--output-prefix", prefix, "--append-eod", "--workers", "2"]
               + tokenizer_args[kind]) == 0
    tok = build_tokenizer(spec_of(tokenizer_args[kind]))
    docs = read_dataset(f"{prefix}_text_document")
    assert len(docs) == len(documents)
    for sequences, text in zip(docs, documents):
        assert len(sequences) == 1  # one sequence per document without --split-sentences
        ids = sequences[0]
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1].tolist()) == text
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_workers_and_partitions_are_byte_identical(tmp_path, corpus_jsonl, tokenizer_args, monkeypatch):
    # Small batches so that two workers really interleave (60 documents -> 15 batches).
    monkeypatch.setattr(encoder, "BATCH_MAX_DOCS", 4)
    base = ["--input", corpus_jsonl, "--append-eod"] + tokenizer_args["SentencePieceTokenizer"]
    outputs = {}
    for name, extra in {"w1": ["--workers", "1"], "w2": ["--workers", "2"],
                        "p2": ["--workers", "2", "--partitions", "2"]}.items():
        assert run(base + ["--output-prefix", tmp_path / name] + extra) == 0
        outputs[name] = [(tmp_path / f"{name}_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    assert outputs["w2"] == outputs["w1"]
    assert outputs["p2"] == outputs["w1"]
    assert not [f for f in os.listdir(tmp_path) if "incomplete" in f or "partition" in f]


def test_split_sentences_keep_newlines_is_exact(tmp_path, corpus_jsonl, documents, tokenizer_args, monkeypatch):
    monkeypatch.setattr(encoder, "BATCH_MAX_DOCS", 4)
    sp = tokenizer_args["SentencePieceTokenizer"]
    base = ["--input", corpus_jsonl, "--append-eod", "--split-sentences", "--keep-newlines"] + sp
    assert run(base + ["--output-prefix", tmp_path / "w1"]) == 0
    assert run(base + ["--output-prefix", tmp_path / "w2", "--workers", "2"]) == 0
    for s in (".bin", ".idx"):
        assert (tmp_path / f"w1_text_sentence{s}").read_bytes() == (tmp_path / f"w2_text_sentence{s}").read_bytes()
    tok = build_tokenizer(spec_of(sp))
    docs = read_dataset(f"{tmp_path}/w1_text_sentence")
    assert sum(len(d) > 1 for d in docs) > len(docs) // 2  # documents really were split
    for sequences, text in zip(docs, documents):
        assert all(tok.eod not in s for s in sequences[:-1]) and sequences[-1][-1] == tok.eod
        sentences = [s.tolist() for s in sequences]
        sentences[-1] = sentences[-1][:-1]
        # Every sentence keeps its trailing whitespace, so the sentences concatenate to the text.
        assert "".join(tok.detokenize(s) for s in sentences) == text


def test_split_sentences_drops_only_whitespace_between_sentences(tmp_path, corpus_jsonl, documents, tokenizer_args):
    sp = tokenizer_args["SentencePieceTokenizer"]
    assert run(["--input", corpus_jsonl, "--split-sentences", "--output-prefix", tmp_path / "s"] + sp) == 0
    tok = build_tokenizer(spec_of(sp))
    for sequences, text in zip(read_dataset(f"{tmp_path}/s_text_sentence"), documents):
        position = 0
        for i, sequence in enumerate(sequences):
            sentence = tok.detokenize(sequence.tolist())
            found = text.index(sentence, position)
            assert text[position:found].strip() == ""  # only whitespace was dropped
            if i < len(sequences) - 1:
                assert sentence == sentence.rstrip()  # ... namely the whitespace after a sentence
            position = found + len(sentence)
        assert text[position:].strip() == ""


def test_text_inputs_per_file_and_per_block(tmp_path, documents, tokenizer_args):
    sp = tokenizer_args["SentencePieceTokenizer"]
    tok = build_tokenizer(spec_of(sp))
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, doc in enumerate(documents[:5]):
        (texts / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    assert run(["--input", f"{texts}/*.txt", "--output-prefix", tmp_path / "files"] + sp) == 0
    got = [tok.detokenize(d[0].tolist()) for d in read_dataset(f"{tmp_path}/files_text_document")]
    assert got == documents[:5]

    blocks = ["First block\nstill first.", "Second  block.", "Third\n  indented line"]
    (tmp_path / "blocks.txt").write_text("\n\n".join(blocks[:2]) + "\n\n  \n\n" + blocks[2] + "\n", encoding="utf-8")
    assert run(["--input", tmp_path / "blocks.txt", "--txt-mode", "blank-lines",
                "--output-prefix", tmp_path / "blocks"] + sp) == 0
    got = [tok.detokenize(d[0].tolist()) for d in read_dataset(f"{tmp_path}/blocks_text_document")]
    assert got == blocks


def test_several_json_keys_and_presplit_lists(tmp_path, tokenizer_args):
    sp = tokenizer_args["SentencePieceTokenizer"]
    tok = build_tokenizer(spec_of(sp))
    path = tmp_path / "multi.jsonl"
    rows = [{"title": "A title.", "body": ["First sentence. ", "Second one."]},
            {"title": "Another.", "body": ["Only one."]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert run(["--input", path, "--json-keys", "title", "body", "--append-eod",
                "--output-prefix", tmp_path / "m"] + sp) == 0
    titles = read_dataset(f"{tmp_path}/m_title_document")
    bodies = read_dataset(f"{tmp_path}/m_body_document")
    assert [tok.detokenize(d[0][:-1].tolist()) for d in titles] == ["A title.", "Another."]
    # A list value is a document already split into sentences: one sequence each.
    assert [len(d) for d in bodies] == [2, 1]
    assert tok.detokenize(bodies[0][0].tolist()) == "First sentence. "


def test_progress_log_reports_rates(tmp_path, corpus_jsonl, tokenizer_args, capsys):
    assert run(["--input", corpus_jsonl, "--output-prefix", tmp_path / "o", "--log-interval", "20"]
               + tokenizer_args["SentencePieceTokenizer"]) == 0
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.startswith("Processed")]
    assert len(lines) == 3 and all("docs/s" in l and "MB/s" in l for l in lines)
    assert "Processed 60 documents" in captured.out and "MB/s" in captured.out


def test_null_tokenizer_round_trip(tmp_path):
    """NullTokenizer: the .bin holds exactly the text's ids, then EOD = --vocab-size."""
    vocab = 300  # ids past 255: a uint8 would truncate them
    docs = make_id_documents(50, vocab, seed=3)
    data = write_jsonl(str(tmp_path / "ids.jsonl"), [id_text(d, seed=i) for i, d in enumerate(docs)])
    assert run(["--input", data, "--output-prefix", tmp_path / "out", "--append-eod", "--workers", "2",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab]) == 0
    got = read_dataset(f"{tmp_path}/out_text_document")
    assert [d[0].tolist() for d in got] == [ids + [vocab] for ids in docs]
    assert all(len(d) == 1 for d in got)

    # Plain text: one document per blank-line-separated block, ids across several lines.
    (tmp_path / "ids.txt").write_text("\n\n".join(id_text(d, seed=i) for i, d in enumerate(docs[:5])) + "\n")
    assert run(["--input", tmp_path / "ids.txt", "--txt-mode", "blank-lines", "--output-prefix", tmp_path / "txt",
                "--append-eod", "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab]) == 0
    assert [d[0].tolist() for d in read_dataset(f"{tmp_path}/txt_text_document")] == [ids + [vocab] for ids in docs[:5]]


def test_tokenizer_json_only_directory_with_eod_token(tmp_path, corpus_jsonl, documents, hf_json_only_dir):
    from tokenizers import Tokenizer

    argv = ["--input", corpus_jsonl, "--output-prefix", tmp_path / "out", "--append-eod", "--workers", "2",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_json_only_dir,
            "--eod-token", JSON_ONLY_EOD]
    assert run(argv) == 0
    reference = Tokenizer.from_file(f"{hf_json_only_dir}/tokenizer.json")
    eod = reference.token_to_id(JSON_ONLY_EOD)
    got = read_dataset(f"{tmp_path}/out_text_document")
    assert [d[0].tolist() for d in got] == [reference.encode(t, add_special_tokens=False).ids + [eod]
                                            for t in documents]


def test_help_documents_inputs_and_punkt(capsys):
    with pytest.raises(SystemExit):
        preprocess.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "blank-lines" in text and "one document per file" in text
    assert "Punkt is trained on the input itself" in text
