"""Empty and whitespace-only documents are written as Megatron-LM's preprocess_data.py writes
them: no tokens -> a document of zero sequences (no EOD); whitespace the tokenizer keeps -> its
tokens and EOD. --reject-empty-documents keeps the strict refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mosaic.data import preprocess
from megatron_mosaic.data.tokenizers import build_tokenizer
from megatron_mosaic.data.preprocess import get_parser

TEXTS = ["One good document.", "", "   \n\t ", "Another good one."]


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPT2BPETokenizer"])
@pytest.mark.parametrize("workers", [1, 2])
def test_empty_and_whitespace_documents_as_megatron_lm(tmp_path, tokenizer_args, kind, workers):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    flags = tokenizer_args[kind]
    assert preprocess.main(["--input", str(data), "--output-prefix", str(tmp_path / "ds"), "--append-eod",
                            "--workers", str(workers)] + [str(f) for f in flags]) == 0
    tokenizer = build_tokenizer(get_parser().parse_args(["--input", "x", "--output-prefix", "y"]
                                                        + [str(f) for f in flags]))
    expected = []  # Megatron-LM's Encoder.encode: tokens, EOD only after a non-empty document
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        expected.append(ids + [tokenizer.eod] if ids else [])
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert len(ds.document_indices) - 1 == len(TEXTS)  # every document, empty ones included
    sequences_per_doc = np.diff(ds.document_indices).tolist()
    assert sequences_per_doc == [1 if ids else 0 for ids in expected]
    assert sequences_per_doc[1] == 0  # "" -> zero sequences
    got = [ds[int(ds.document_indices[d])].tolist() for d in range(len(TEXTS)) if expected[d]]
    assert got == [ids for ids in expected if ids]


def test_reject_empty_documents_keeps_the_strict_refusal(tmp_path, tokenizer_args, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    code = preprocess.main(["--input", str(data), "--output-prefix", str(tmp_path / "ds"),
                            "--reject-empty-documents"]
                           + [str(f) for f in tokenizer_args["SentencePieceTokenizer"]])
    assert code == 1
    assert f"{data}:2: empty document: key 'text' has no text" in capsys.readouterr().err
