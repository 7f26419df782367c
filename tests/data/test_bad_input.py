"""Bad input: errors name the file and line (or are counted and skipped), never a stray .bin/.idx."""

from __future__ import annotations

import json
import os

import pytest

from megatron_mosaic.data import preprocess
from tests.data.test_preprocess import read_dataset

GOOD = [json.dumps({"text": t}).encode() for t in ("One good document.", "Another good one.", "Third.")]


def run(argv, capsys) -> tuple[int, str]:
    code = preprocess.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# (bad line, expected message fragment); the bad line is line 2 of its file.
BAD_LINES = {
    "malformed": (b'{"text": "unterminated', "malformed JSON: Unterminated string"),
    "not_object": (b'["a", "list"]', "malformed JSON: expected a JSON object, got list"),
    "missing_key": (b'{"body": "no text key"}', "missing key: no key 'text' (keys: 'body')"),
    "empty": (b'{"text": "  \\n "}', "empty document: key 'text' has no text"),
    "not_text": (b'{"text": 42}', "bad value: key 'text' holds int, expected a string"),
    "non_utf8": (b'{"text": "caf\xe9 au lait"}', "invalid UTF-8: byte 0xe9 at column 14"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, tokenizer_args, capsys, case):
    bad, message = BAD_LINES[case]
    data = write_lines(tmp_path / "in.jsonl", [GOOD[0], bad, GOOD[1]])
    out = tmp_path / "out"
    out.mkdir()
    # --reject-empty-documents: the empty case is refused (by default it is written as
    # Megatron-LM writes it, see test_empty_documents.py).
    code, err = run(["--input", data, "--output-prefix", out / "ds", "--workers", "2",
                     "--reject-empty-documents"] + tokenizer_args["SentencePieceTokenizer"], capsys)
    assert code == 1
    assert f"{data}:2: {message}" in err
    assert "--skip-bad-lines" in err
    assert os.listdir(out) == []  # no .bin, no .idx, no temporary files


def test_skip_bad_lines_counts_and_summarises(tmp_path, tokenizer_args, capsys):
    lines = [GOOD[0]] + [BAD_LINES[c][0] for c in sorted(BAD_LINES)] + [GOOD[1], BAD_LINES["malformed"][0], GOOD[2]]
    data = write_lines(tmp_path / "in.jsonl", lines)
    code = preprocess.main(["--input", data, "--output-prefix", str(tmp_path / "ds"), "--skip-bad-lines",
                            "--workers", "2", "--reject-empty-documents"]
                           + tokenizer_args["SentencePieceTokenizer"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(read_dataset(f"{tmp_path}/ds_text_document")) == 3
    assert "skipped 7 documents:" in out
    assert f"3 x malformed JSON (first: {data}:3: malformed JSON: Unterminated string" in out
    for kind, count in (("missing key", 1), ("empty document", 1), ("invalid UTF-8", 1), ("bad value", 1)):
        assert f"{count} x {kind}" in out


def test_non_utf8_in_text_file_names_the_line(tmp_path, tokenizer_args, capsys):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"line one\nline two\nline \xff three\n")
    code, err = run(["--input", path, "--output-prefix", tmp_path / "ds"] + tokenizer_args["SentencePieceTokenizer"], capsys)
    assert code == 1 and f"{path}:3: invalid UTF-8: byte 0xff at column 6" in err


def test_missing_tokenizer_files(tmp_path, corpus_jsonl, gpt2_files, capsys):
    missing = tmp_path / "missing.model"
    code, err = run(["--input", corpus_jsonl, "--output-prefix", tmp_path / "ds",
                     "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", missing], capsys)
    assert code == 1 and f"--tokenizer-model {missing}: no such file" in err
    code, err = run(["--input", corpus_jsonl, "--output-prefix", tmp_path / "ds", "--tokenizer-type",
                     "GPT2BPETokenizer", "--vocab-file", gpt2_files[0]], capsys)
    assert code == 1 and "GPT2BPETokenizer needs --merge-file" in err
    assert [f for f in os.listdir(tmp_path) if f.startswith("ds")] == []


def test_output_prefix_in_missing_directory(tmp_path, corpus_jsonl, tokenizer_args, capsys):
    code, err = run(["--input", corpus_jsonl, "--output-prefix", tmp_path / "nodir" / "ds"]
                    + tokenizer_args["SentencePieceTokenizer"], capsys)
    assert code == 1 and f"directory {tmp_path / 'nodir'} does not exist" in err


def test_missing_input_and_bad_worker_counts(tmp_path, tokenizer_args, corpus_jsonl, capsys):
    sp = tokenizer_args["SentencePieceTokenizer"]
    code, err = run(["--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "ds"] + sp, capsys)
    assert code == 1 and f"--input {tmp_path / 'none.jsonl'}: no such file" in err
    code, err = run(["--input", f"{tmp_path}/*.jsonl", "--output-prefix", tmp_path / "ds"] + sp, capsys)
    assert code == 1 and "no file matches" in err
    code, err = run(["--input", corpus_jsonl, "--output-prefix", tmp_path / "ds", "--workers", "3",
                     "--partitions", "2"] + sp, capsys)
    assert code == 1 and "--workers 3 must be a multiple of --partitions 2" in err


def test_failed_run_keeps_previous_output_intact(tmp_path, corpus_jsonl, documents, tokenizer_args, capsys):
    sp = tokenizer_args["SentencePieceTokenizer"]
    prefix = tmp_path / "ds"
    assert preprocess.main(["--input", corpus_jsonl, "--output-prefix", str(prefix)] + sp) == 0
    before = [(tmp_path / f"ds_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD[0], GOOD[1], b"{oops"])
    code, err = run(["--input", bad, "--output-prefix", prefix] + sp, capsys)
    assert code == 1 and f"{bad}:3: malformed JSON" in err
    assert [(tmp_path / f"ds_text_document{s}").read_bytes() for s in (".bin", ".idx")] == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "ds_text_document.bin", "ds_text_document.idx"]


def test_interrupted_commit_never_leaves_a_valid_looking_pair(tmp_path, monkeypatch):
    """Crash after the new .bin is in place but before its .idx: the prefix must not look valid."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "ds")
    old = preprocess.AtomicIndexedWriter(prefix, np.uint16)
    old.add_document(np.array([1, 2, 3], dtype=np.uint16), [3])
    old.commit()
    assert IndexedDataset.exists(prefix)

    new = preprocess.AtomicIndexedWriter(prefix, np.uint16)
    new.add_document(np.array([4, 5], dtype=np.uint16), [2])
    real_replace = os.replace

    def crash_on_idx(src, dst):
        if dst.endswith(".idx"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    with pytest.raises(OSError, match="simulated crash"):
        new.commit()
    assert not IndexedDataset.exists(prefix)  # the old .idx is gone, the new one never arrived


def test_nothing_usable_is_an_error(tmp_path, tokenizer_args, capsys):
    data = write_lines(tmp_path / "in.jsonl", [BAD_LINES["malformed"][0], BAD_LINES["empty"][0]])
    code, err = run(["--input", data, "--output-prefix", tmp_path / "ds", "--skip-bad-lines",
                     "--reject-empty-documents"] + tokenizer_args["SentencePieceTokenizer"], capsys)
    assert code == 1 and "no usable documents, nothing written" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_bad_line_in_a_partition(tmp_path, tokenizer_args, capsys):
    data = write_lines(tmp_path / "in.jsonl", GOOD + GOOD + [BAD_LINES["missing_key"][0]])
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["--input", data, "--output-prefix", out / "ds", "--workers", "2", "--partitions", "2"]
                    + tokenizer_args["SentencePieceTokenizer"], capsys)
    assert code == 1 and f"{data}:7: missing key" in err
    assert os.listdir(out) == []


NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


@pytest.mark.parametrize("bad, message", [
    (b'{"text": "4 5 six 7"}', "invalid token id: key 'text': 'six' is not a token id"),
    (b'{"text": "4 5 100"}', "invalid token id: key 'text': token id 100 is outside [0, 100) (--vocab-size 100; "
                             "100 is the EOD id)"),
    (b'{"text": "-1 3"}', "invalid token id: key 'text': '-1' is not a token id"),
])
def test_null_tokenizer_bad_id_names_file_and_line(tmp_path, capsys, bad, message):
    good = [json.dumps({"text": t}).encode() for t in ("1 2 3", "4 5 6")]
    data = write_lines(tmp_path / "in.jsonl", [good[0], bad, good[1]])
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["--input", data, "--output-prefix", out / "ds", "--workers", "2"] + NULL_TOKENIZER, capsys)
    assert code == 1
    assert f"error: {data}:2: {message}" in err, err
    assert "Traceback" not in err
    assert os.listdir(out) == []


def test_null_tokenizer_bad_id_in_a_text_file_names_its_line(tmp_path, capsys):
    """A .txt document spans lines: the error names the line of the bad word, not the first."""
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n4 5\n6 7 8.5 9\n10\n")
    code, err = run(["--input", path, "--output-prefix", tmp_path / "ds"] + NULL_TOKENIZER, capsys)
    assert code == 1 and f"{path}:3: invalid token id: key 'text': '8.5' is not a token id" in err, err
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("1 2\n3\n\n4\n5 x\n")
    code, err = run(["--input", blocks, "--txt-mode", "blank-lines", "--output-prefix", tmp_path / "ds"]
                    + NULL_TOKENIZER, capsys)
    assert code == 1 and f"{blocks}:5: invalid token id: key 'text': 'x' is not a token id" in err, err


def test_null_tokenizer_skip_bad_lines_counts_bad_ids(tmp_path, capsys):
    lines = [json.dumps({"text": t}).encode() for t in ("1 2", "3 x", "4 5", "6 200", "7")]
    data = write_lines(tmp_path / "in.jsonl", lines)
    code = preprocess.main(["--input", data, "--output-prefix", str(tmp_path / "ds"), "--skip-bad-lines",
                            "--append-eod"] + NULL_TOKENIZER)
    assert code == 0
    assert [d[0].tolist() for d in read_dataset(f"{tmp_path}/ds_text_document")] == [[1, 2, 100], [4, 5, 100], [7, 100]]
    assert f"2 x invalid token id (first: {data}:2: invalid token id: key 'text': 'x'" in capsys.readouterr().out


def _only_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one clear line, no traceback
    return lines[0]


def test_tokenizer_option_errors_are_one_line(tmp_path, corpus_jsonl, hf_json_only_dir, capsys):
    base = ["--input", corpus_jsonl, "--output-prefix", tmp_path / "ds"]
    code, err = run(base + ["--tokenizer-type", "NullTokenizer"], capsys)
    assert code == 1 and _only_error_line(err) == (
        "error: --tokenizer-type NullTokenizer needs --vocab-size N (token ids are 0..N-1; N is the EOD id)")
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_json_only_dir]
    code, err = run(base + hf, capsys)
    assert code == 1 and _only_error_line(err).endswith(
        "the tokenizer has no eos_token, which is the EOD token; name its end-of-document token with --eod-token TOKEN")
    code, err = run(base + hf + ["--eod-token", "<eos>"], capsys)
    assert code == 1 and _only_error_line(err) == (
        f"error: --eod-token '<eos>': not in the vocabulary of --tokenizer-model {hf_json_only_dir}")
    code, err = run(base + hf + ["--vocab-size", "100"], capsys)
    assert code == 1 and _only_error_line(err) == (
        "error: --vocab-size applies to --tokenizer-type NullTokenizer only, not HuggingFaceTokenizer")
    assert [f for f in os.listdir(tmp_path) if f.startswith("ds")] == []
