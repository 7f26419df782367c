"""`make icl` (examples/icl.sh) end to end in a tiny mode, and the layout of its training data.

The tiny mode only shrinks the knobs icl.sh already has (iterations, length, vocabulary, symbols,
documents); the corpus is a generated word list so no download is needed. What the full run
reports (the three models side by side) must come out of the same script.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
import subprocess
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("mosaic-v1", "mosaic-v2", "gpt")
LEN, VOCAB = 32, 100
TINY = {"ICL_ITERS": "2", "ICL_SEQ_LENGTH": str(LEN), "ICL_VOCAB": str(VOCAB), "ICL_SYMBOLS": "12",
        "ICL_TRAIN_DOCS": "24", "ICL_EVAL_DOCS": "2", "ICL_NPROC": "1"}


def write_corpus(directory: Path) -> None:
    """train.jsonl / valid.jsonl of made-up words, long enough for the 8x-length documents."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    directory.mkdir(parents=True)
    for split, works in (("train", 3), ("valid", 2)):
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(works):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2000))}) + "\n")


@pytest.fixture(scope="module")
def icl_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("icl")
    write_corpus(root / "text")
    env = {**os.environ, **TINY, "ICL_DATA": str(root / "data"), "ICL_RUNS": str(root / "runs"),
           "SHAKESPEARE": str(root / "text"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", str(ROOT / "examples" / "icl.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"data": root / "data", "runs": root / "runs", "stdout": result.stdout}


def test_icl_writes_one_report_with_the_three_models(icl_run):
    runs = icl_run["runs"]
    report = (runs / "report.md").read_text(encoding="utf-8")
    for model in MODELS:
        assert f"| {model} |" in report, report[:2000]  # the training summary row
        assert (runs / model / "checkpoints" / "latest_checkpointed_iteration.txt").is_file()
    for task in ("recall", "fewshot", "multidoc", "lm"):
        with open(runs / f"{task}.csv", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["group"] == "all"]
        # every model, at 1x, 4x and 8x the training length, with its parameter count
        assert {(r["model"], int(r["length"])) for r in rows} == {(m, n * LEN) for m in MODELS for n in (1, 4, 8)}
        assert all(int(r["parameters"]) > 0 for r in rows)
        assert (runs / f"{task}_vs_length.png").stat().st_size > 0
    assert "report.md" in icl_run["stdout"].splitlines()[-1]


def test_every_training_sequence_is_one_whole_document(icl_run):
    """A recall query is only answerable if its key-value pair is in the same sequence. With
    documents of LEN ids + EOD (one token longer than a sequence) every sequence began inside a
    document and half the queries had lost their pairs: each document must be one sequence."""
    from megatron_mosaic.data.datasets import build_train_valid_test_datasets
    from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer

    tokenizer = build_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=VOCAB))
    prefixes = sorted(p[:-len(".idx")] for p in glob.glob(str(icl_run["data"] / "*_text_document.idx")))
    training = [p for p in prefixes if not os.path.basename(p).startswith("valid")]
    assert len(training) == 4, prefixes
    for prefix in training:
        args = types.SimpleNamespace(train_data_path=[prefix], valid_data_path=None, test_data_path=None,
                                     data_path=None, split=None, data_cache_path=None, mock_data=False)
        train, _, _ = build_train_valid_test_datasets(args, tokenizer, LEN, 1234, [48, None, None])
        for i in range(48):
            tokens = train[i]["tokens"].tolist()
            eods = [j for j, t in enumerate(tokens) if t == tokenizer.eod]
            assert eods == [LEN - 1], f"{os.path.basename(prefix)} sample {i}: EOD at {eods}, want only at {LEN - 1}"
