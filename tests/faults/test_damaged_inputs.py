"""Damaged data and checkpoints are named before training; user errors are one line.

The up-front data check covers every document (``.bin`` against ``.idx``, the largest token
id against the vocabulary); a damaged checkpoint on ``--load`` is named by file and tensor
before a model exists; ``--load`` of a missing path is an error, of an empty directory a
fresh start said on rank 0. Through ``pretrain_mosaic.py`` (one process and torchrun) each is
one ``ERROR:`` line from rank 0, exit status 1, no traceback of ours, no process left.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from megatron_mosaic.data.corpus import DataError
from megatron_mosaic.data.validate import validate_dataset
from megatron_mosaic.training.checkpoint_safety import (
    CheckpointDamagedError,
    CheckpointNotFoundError,
    resolve_load,
    verify_checkpoint,
)
from tests.faults.common import MOCK, PY, REPO, SCRIPT, run_job, torchrun

OUR_FRAMES = f'File "{REPO}/megatron_mosaic'
VOCAB = 100


def _write_dataset(prefix: str, documents: list[list[int]], dtype=np.uint16) -> str:
    from megatron_mosaic.data.preprocess import AtomicIndexedWriter

    writer = AtomicIndexedWriter(prefix, dtype)
    for doc in documents:
        writer.add_document(np.array(doc, dtype=dtype), [len(doc)])
    writer.commit()
    return prefix


def _documents(n: int, eod: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 60))] + [eod] for _ in range(n)]


# ---- the data check, in process -----------------------------------------------------------------
def test_every_document_is_checked(tmp_path):
    docs = _documents(400, eod=2)
    good = _write_dataset(str(tmp_path / "good"), docs)
    summary = validate_dataset(good, VOCAB, eod_id=2)
    assert summary.num_documents == 400 and summary.documents_ending_with_eod == 400
    assert summary.num_tokens == sum(len(d) for d in docs)
    assert summary.max_token_id == max(max(d) for d in docs)

    # One id beyond the vocabulary in the last document but one: found, located, named.
    late = [list(d) for d in docs]
    late[398][5] = VOCAB + 3
    bad = _write_dataset(str(tmp_path / "late"), late)
    with pytest.raises(DataError, match=rf"--data-path: {bad}\.bin holds token id {VOCAB + 3}, beyond the "
                                        rf"tokenizer's vocab size {VOCAB} \(token \d+, document 398\)"):
        validate_dataset(bad, VOCAB)

    # A .bin cut to 81% (the copy of a large file interrupted), and one with bytes appended.
    cut = str(tmp_path / "cut")
    shutil.copy(good + ".idx", cut + ".idx")
    with open(good + ".bin", "rb") as src, open(cut + ".bin", "wb") as dst:
        dst.write(src.read(int(os.path.getsize(good + ".bin") * 0.81)))
    with pytest.raises(DataError, match=rf"{cut}\.bin: truncated: \d+ bytes, but {cut}\.idx describes \d+"):
        validate_dataset(cut, VOCAB)
    with open(cut + ".bin", "wb") as dst, open(good + ".bin", "rb") as src:
        dst.write(src.read() + b"\0\0")
    with pytest.raises(DataError, match=r"longer than its index describes"):
        validate_dataset(cut, VOCAB)

    # A truncated .idx, a foreign file as .idx, a missing .bin.
    shutil.copy(good + ".bin", cut + ".bin")
    with open(good + ".idx", "rb") as src, open(cut + ".idx", "wb") as dst:
        dst.write(src.read()[:-100])
    with pytest.raises(DataError, match=rf"{cut}\.idx: truncated index"):
        validate_dataset(cut, VOCAB)
    with open(cut + ".idx", "wb") as dst:
        dst.write(b"not an index at all, but long enough to hold a header")
    with pytest.raises(DataError, match=rf"{cut}\.idx: not a Megatron index file"):
        validate_dataset(cut, VOCAB)
    os.remove(cut + ".bin")
    with pytest.raises(DataError, match=rf"no dataset {cut}\.bin/\.idx: {cut}\.bin does not exist"):
        validate_dataset(cut, VOCAB)


def test_large_dataset_checked_in_chunks(tmp_path, monkeypatch):
    """The .bin is read in bounded chunks; an id in the last chunk is still found."""
    from megatron_mosaic.data import validate

    monkeypatch.setattr(validate, "_CHUNK_TOKENS", 64)
    docs = _documents(50, eod=2, seed=1)
    docs[-1][-2] = VOCAB
    prefix = _write_dataset(str(tmp_path / "chunks"), docs)
    with pytest.raises(DataError, match=r"document 49"):
        validate_dataset(prefix, VOCAB)
    assert validate_dataset(prefix, VOCAB + 1).max_token_id == VOCAB


# ---- checkpoints, in process --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A real two-rank checkpoint of the tiny model (two shard files), made once."""
    root = tmp_path_factory.mktemp("ckpt")
    save = str(root / "ckpt")
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "2", "--save", save],
                  str(root / "log"))
    assert job.returncode == 0, job.output[-3000:]
    return save


def _damaged_copy(checkpoint: str, tmp_path, how: str) -> tuple[str, str]:
    dst = str(tmp_path / how)
    shutil.copytree(checkpoint, dst)
    it = os.path.join(dst, "iter_0000002")
    shard = os.path.join(it, "__0_1.distcp")
    if how == "truncated":
        os.truncate(shard, os.path.getsize(shard) * 2 // 3)
    elif how == "missing":
        os.remove(shard)
    elif how == "zeroed":  # same size, contents gone (a bad block)
        with open(shard, "r+b") as f:
            f.write(b"\0" * os.path.getsize(shard))
    elif how == "common":
        with open(os.path.join(it, "common.pt"), "wb") as f:
            f.write(b"garbage")
    elif how == "metadata":
        os.truncate(os.path.join(it, ".metadata"), 100)
    elif how == "tracker":
        with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7")
    return dst, shard


@pytest.mark.parametrize("how, message", [
    ("truncated", r"__0_1\.distcp: truncated to \d+ bytes; tensor '[\w.]+'( at offset \([\d, ]+\))? needs bytes \d+\.\.\d+"),
    ("missing", r"__0_1\.distcp: shard file missing; it holds tensor '[\w.]+'"),
    ("zeroed", r"__0_1\.distcp: (tensor|object) '[\w.]+'.* at byte \d+ is not a stored item"),
    ("common", r"common\.pt: unreadable"),
    ("metadata", r"\.metadata: unreadable"),
    ("tracker", r"latest_checkpointed_iteration\.txt names iteration 7 but .*iter_0000007 does not exist"),
])
def test_checkpoint_damage_is_named(checkpoint, tmp_path, how, message):
    verify_checkpoint(os.path.join(checkpoint, "iter_0000002"))  # the original is whole
    damaged, _ = _damaged_copy(checkpoint, tmp_path, how)
    with pytest.raises(CheckpointDamagedError, match=message):
        resolve_load(damaged)


def test_what_load_means(tmp_path, checkpoint):
    assert resolve_load(checkpoint) == os.path.join(checkpoint, "iter_0000002")
    assert resolve_load(os.path.join(checkpoint, "iter_0000002")) == os.path.join(checkpoint, "iter_0000002")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_load(str(empty)) is None  # "no checkpoint in X, starting from scratch"
    missing = str(tmp_path / "typo")
    with pytest.raises(CheckpointNotFoundError, match=rf"--load {missing}: no such directory"):
        resolve_load(missing)
    # The first run of a command that resumes itself: --save D --load D, D not made yet.
    assert resolve_load(missing, save=missing) is None


# ---- through pretrain_mosaic.py ------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A SentencePiece tokenizer and datasets: a good one, one cut short, one with a foreign id
    near its end."""
    from megatron_mosaic.data.tokenizer_training import train_sentencepiece
    from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer
    from tests.data.conftest import make_documents

    root = tmp_path_factory.mktemp("corpus")
    texts = make_documents(200, seed=3)
    model = train_sentencepiece(texts, str(root / "sp"), vocab_size=400, model_type="bpe")
    tokenizer = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", tokenizer_model=model))
    docs = [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]
    good = _write_dataset(str(root / "good"), docs)
    cut = str(root / "cut")
    shutil.copy(good + ".idx", cut + ".idx")
    with open(good + ".bin", "rb") as src, open(cut + ".bin", "wb") as dst:
        dst.write(src.read(int(os.path.getsize(good + ".bin") * 0.81)))
    foreign = [list(d) for d in docs]
    foreign[-3][1] = tokenizer.vocab_size + 10
    late = _write_dataset(str(root / "late"), foreign)
    return {"model": model, "good": good, "cut": cut, "late": late, "vocab": tokenizer.vocab_size}


def _data_args(corpus, prefix: str) -> list[str]:
    args = [a for a in MOCK if a not in ("--mock-data",)]
    i = args.index("--vocab-size")
    del args[i:i + 2]
    return args + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["model"],
                   "--data-path", prefix, "--split", "90,10,0", "--train-iters", "2"]


def _assert_one_error(job, *, expected: str, status: int = 1) -> None:
    out = job.output
    assert job.returncode == status if status else job.returncode != 0, out[-3000:]
    assert len(job.errors()) == 1, out[-3000:]
    assert expected in job.errors()[0], job.errors()[0]
    assert OUR_FRAMES not in out, out[-3000:]  # no traceback through our code, on any rank
    assert " iteration " not in out, "training started before the problem was found"
    assert job.left == [], f"processes left: {job.left}"


def test_cli_truncated_bin_one_process(corpus, tmp_path):
    job = run_job([PY, SCRIPT, *_data_args(corpus, corpus["cut"])], str(tmp_path / "log"))
    _assert_one_error(job, expected=f"{corpus['cut']}.bin: truncated")


def test_cli_foreign_token_id_two_ranks(corpus, tmp_path):
    job = run_job(torchrun(2) + [SCRIPT, *_data_args(corpus, corpus["late"])], str(tmp_path / "log"))
    # torchrun reports the failed workers itself; the message is rank 0's, once.
    _assert_one_error(job, expected=f"{corpus['late']}.bin holds token id {corpus['vocab'] + 10}", status=None)


def test_cli_damaged_checkpoint_two_ranks(checkpoint, tmp_path):
    damaged, shard = _damaged_copy(checkpoint, tmp_path, "truncated")
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "4", "--load", damaged],
                  str(tmp_path / "log"))
    _assert_one_error(job, expected=f"{shard}: truncated to", status=None)


def test_cli_load_missing_and_empty(tmp_path):
    missing = str(tmp_path / "typo")
    job = run_job([PY, SCRIPT, *MOCK, "--train-iters", "2", "--load", missing], str(tmp_path / "log1"))
    _assert_one_error(job, expected=f"--load {missing}: no such directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "2", "--load", str(empty)],
                  str(tmp_path / "log2"))
    assert job.returncode == 0, job.output[-3000:]
    assert job.output.count(f"no checkpoint in {empty}, starting from scratch") == 1, job.output[-3000:]
    assert job.left == []
