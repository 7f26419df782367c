"""Reading raw corpora: JSON lines or plain text, one record per document, with provenance.

Readers hand out raw *bytes* with the file and line a document starts at; decoding (UTF-8, JSON,
key lookup) happens later, possibly in a worker process, and every failure names that file and
line. Input formats:

- ``.jsonl`` / ``.json``: one JSON object per line; the text is under ``--json-keys``.
- ``.txt``: either one document per file (``txt_mode="file"``) or one document per block of
  non-blank lines (``txt_mode="blank-lines"``; blocks are separated by blank lines).

Also shared by the data tools: the flags that choose how a corpus is read (``add_corpus_args``)
and how output files are written (under a temporary name, renamed into place when complete).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
TXT_MODES = ("file", "blank-lines")
INPUT_FORMATS = ("auto", "jsonl", "txt")

# Kinds of bad document; each can be skipped (counted) instead of failing the run.
MALFORMED_JSON = "malformed JSON"
MISSING_KEY = "missing key"
BAD_VALUE = "bad value"
EMPTY_DOCUMENT = "empty document"
INVALID_UTF8 = "invalid UTF-8"
TOKENIZER_FAILURE = "tokenizer failure"
INVALID_TOKEN_ID = "invalid token id"  # NullTokenizer text that is not ids in [0, --vocab-size)


class DataError(ValueError):
    """Bad input or output arguments; the message names the file (and line)."""


@dataclass(frozen=True)
class RawDocument:
    """One document as found on disk.

    path: the input file; line: 1-based line where the document starts; data: its raw bytes
    (a JSON line without the newline, a text block, or a whole text file).
    """

    path: str
    line: int
    data: bytes
    is_json: bool

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class DocumentError(Exception):
    """A document that cannot be used; ``kind`` is one of the module's kind constants."""

    def __init__(self, kind: str, where: str, detail: str) -> None:
        super().__init__(f"{where}: {kind}: {detail}")
        self.kind = kind
        self.where = where
        self.detail = detail

    def __reduce__(self):  # crosses process boundaries (worker -> main)
        return (DocumentError, (self.kind, self.where, self.detail))


@dataclass
class SkipSummary:
    """Counts of skipped documents by kind, with the first occurrence of each."""

    counts: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)

    def add(self, err: DocumentError) -> None:
        self.counts[err.kind] = self.counts.get(err.kind, 0) + 1
        self.first.setdefault(err.kind, str(err))

    def merge(self, other: "SkipSummary") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            self.first.setdefault(kind, other.first[kind])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        if not self.total:
            return "skipped 0 documents"
        lines = [f"skipped {self.total} documents:"]
        for kind in sorted(self.counts):
            lines.append(f"  {self.counts[kind]} x {kind} (first: {self.first[kind]})")
        return "\n".join(lines)


def expand_inputs(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Expand file names / glob patterns into a sorted, de-duplicated list of existing files."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--input {pattern}: no file matches")
        for path in matches:
            if os.path.isdir(path):
                raise DataError(f"--input {path}: is a directory (give files or a glob such as '{path}/*.txt')")
            if not os.path.isfile(path):
                raise DataError(f"--input {path}: no such file")
            if path not in paths:
                paths.append(path)
    return paths


def add_corpus_args(parser: argparse.ArgumentParser, json_keys_help: str) -> "argparse._ArgumentGroup":
    """The flags that say how a corpus is read (``--input``, ``--input-format``, ``--txt-mode``,
    ``--json-keys``, ``--skip-bad-lines``), in a new "input data" group, which is returned.

    Shared by tools/preprocess_data.py and tools/train_tokenizer.py so that a tokenizer is
    trained on exactly the documents the preprocessing tool tokenizes. ``json_keys_help`` says
    what the tool does with each key.
    """
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, nargs="+", required=True,
                       help="Input file(s) or glob(s), read in sorted order. JSON lines "
                            "(.jsonl/.json): one JSON object per line, text under --json-keys (a "
                            "list of strings is taken as a document already split into sentences). "
                            "Plain text (.txt): one document per file, or with --txt-mode "
                            "blank-lines one document per block of lines separated by blank lines.")
    group.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                       help="Input format; auto decides by file suffix.")
    group.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                       help="For .txt input: a document per file, or per blank-line-separated block.")
    group.add_argument("--json-keys", nargs="+", default=["text"], help=json_keys_help)
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="Skip (and count, with a summary at the end) documents that are malformed "
                            "JSON, lack a key, are empty, are not UTF-8, or (NullTokenizer) hold a word that is "
                            "not a token id in range, instead of stopping at the "
                            "first one with an error naming its file and line.")
    return group


def is_json_input(path: str, input_format: str = "auto") -> bool:
    """True for JSON lines, False for plain text; ``input_format`` is auto, jsonl or txt."""
    if input_format == "jsonl":
        return True
    if input_format == "txt":
        return False
    lower = path.lower()
    if lower.endswith(JSON_SUFFIXES):
        return True
    if lower.endswith(TEXT_SUFFIXES):
        return False
    raise DataError(f"--input {path}: unknown format (expected .jsonl/.json or .txt; or pass --input-format)")


def _iter_blank_line_blocks(path: str) -> Iterator[RawDocument]:
    block: list[bytes] = []
    start = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                if not block:
                    start = number
                block.append(line)
            elif block:
                yield RawDocument(path, start, b"".join(block).rstrip(b"\r\n"), False)
                block = []
    if block:
        yield RawDocument(path, start, b"".join(block).rstrip(b"\r\n"), False)


def iter_raw_documents(
    paths: Sequence[str], input_format: str = "auto", txt_mode: str = "file"
) -> Iterator[RawDocument]:
    """All documents of ``paths`` in order (files in the given order, documents in file order)."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"--txt-mode {txt_mode!r}: expected one of {', '.join(TXT_MODES)}")
    for path in paths:
        if is_json_input(path, input_format):
            with open(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    yield RawDocument(path, number, line.rstrip(b"\n"), True)
        elif txt_mode == "file":
            with open(path, "rb") as f:
                yield RawDocument(path, 1, f.read(), False)
        else:
            yield from _iter_blank_line_blocks(path)


def _decode_utf8(raw: RawDocument) -> str:
    try:
        return raw.data.decode("utf-8")
    except UnicodeDecodeError as err:
        # Point at the exact line inside a multi-line text document.
        line = raw.line + raw.data.count(b"\n", 0, err.start)
        column = err.start - (raw.data.rfind(b"\n", 0, err.start) + 1)
        bad = raw.data[err.start:err.start + 1].hex()
        raise DocumentError(INVALID_UTF8, f"{raw.path}:{line}", f"byte 0x{bad} at column {column + 1}") from None


def decode_document(raw: RawDocument, json_keys: Sequence[str],
                    allow_empty: bool = False) -> dict[str, Union[str, list[str]]]:
    """The text under each key: a string, or a list of strings (a document pre-split by sentence).

    Raises DocumentError for invalid UTF-8, malformed JSON, a missing key, a value that is not
    text, or (unless ``allow_empty``) a document with no non-whitespace text.
    """
    text = _decode_utf8(raw)
    if raw.is_json:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DocumentError(MALFORMED_JSON, raw.where, f"{err.msg} at column {err.colno}") from None
        if not isinstance(obj, dict):
            raise DocumentError(MALFORMED_JSON, raw.where, f"expected a JSON object, got {type(obj).__name__}")
        values = {}
        for key in json_keys:
            if key not in obj:
                raise DocumentError(MISSING_KEY, raw.where, f"no key {key!r} (keys: {', '.join(map(repr, obj)) or 'none'})")
            values[key] = obj[key]
    else:
        if len(json_keys) != 1:
            raise DocumentError(BAD_VALUE, raw.where, "a text file holds one text per document; give one --json-keys name")
        values = {json_keys[0]: text}
    for key, value in values.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            joined = "".join(value)
        elif isinstance(value, str):
            joined = value
        else:
            raise DocumentError(BAD_VALUE, raw.where, f"key {key!r} holds {type(value).__name__}, expected a string")
        if not joined.strip() and not allow_empty:
            raise DocumentError(EMPTY_DOCUMENT, raw.where, f"key {key!r} has no text")
    return values


def iter_texts(
    paths: Sequence[str],
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    txt_mode: str = "file",
    skip: Optional[SkipSummary] = None,
) -> Iterator[str]:
    """The text of every document and key, in order (for training tokenizers and Punkt).

    A bad document raises DataError, or is counted in ``skip`` when one is given.
    """
    for raw in iter_raw_documents(paths, input_format, txt_mode):
        try:
            values = decode_document(raw, json_keys)
        except DocumentError as err:
            if skip is None:
                raise DataError(str(err)) from None
            skip.add(err)
            continue
        for key in json_keys:
            value = values[key]
            yield value if isinstance(value, str) else "".join(value)


def incomplete_path(path: str) -> str:
    """Where ``path`` is written until it is complete; renaming it into place means a reader never
    sees a partial file and an interrupted run leaves only ``*.incomplete-PID`` behind."""
    return f"{path}.incomplete-{os.getpid()}"


@contextlib.contextmanager
def replaced_when_written(path: str) -> Iterator[str]:
    """Yield :func:`incomplete_path` of ``path`` to write to; rename it to ``path`` once the block
    completes (on an exception ``path`` is left as it was)."""
    tmp = incomplete_path(path)
    yield tmp
    os.replace(tmp, path)


def write_jsonl(path: str, texts: Iterable[str], key: str = "text") -> int:
    """Write one ``{key: text}`` object per line; returns the number of bytes written."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            line = json.dumps({key: text}, ensure_ascii=False) + "\n"
            f.write(line)
            n += len(line.encode("utf-8"))
    return n
