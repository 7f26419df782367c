"""Every tool answers a user error (bad path, bad data, bad checkpoint, bad argument) with one
error line and exit status 1 or 2, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.faults.common import MOCK, REPO, SCRIPT, run_job, torchrun

ERROR_LINE = re.compile(r"^(ERROR: |\S+: error: |error: )")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    a_file = root / "a_file.txt"
    a_file.write_text("not a directory\n")
    ckpt = str(root / "ckpt")
    job = run_job([sys.executable, SCRIPT, *MOCK, "--train-iters", "2", "--save", ckpt], str(root / "log"))
    assert job.returncode == 0, job.output[-2000:]
    damaged = str(root / "damaged")
    shutil.copytree(ckpt, damaged)
    shard = os.path.join(damaged, "iter_0000002", "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    return {"root": str(root), "file": str(a_file), "under_file": str(a_file / "x"), "damaged": damaged}


CASES = {
    "preprocess_data: missing input": ["tools/preprocess_data.py", "--input", "{root}/missing.jsonl",
                                       "--output-prefix", "{root}/out", "--tokenizer-type",
                                       "GPT2BPETokenizer", "--vocab-file", "{root}/v.json", "--merge-file", "{root}/m.txt"],
    "train_tokenizer: output under a file": ["tools/train_tokenizer.py", "--input", "{file}",
                                             "--model-prefix", "{under_file}", "--vocab-size", "100"],
    "fetch_corpus: output under a file": ["tools/fetch_corpus.py", "shakespeare", "--output", "{under_file}"],
    "make_eval_data: output under a file": ["tools/make_eval_data.py", "recall", "--output", "{under_file}/x.jsonl"],
    "benchmark_preprocess: missing input": ["tools/benchmark_preprocess.py", "--input", "{root}/missing.jsonl",
                                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{root}/v.json",
                                            "--merge-file", "{root}/m.txt", "--repeat", "1", "--workers", "1"],
    "bench_memory: bad number": ["tools/bench_memory.py", "--lengths", "0"],
    "bench_layers: bad number": ["tools/bench_layers.py", "--repeats", "-1"],
    "bench_regions: bad number": ["tools/bench_regions.py", "--repeats", "0"],
    "bench_training: one variant": ["tools/bench_training.py", "--variant", "alone="],
    "bench_context_parallel: length not divisible": ["tools/bench_context_parallel.py", "--lengths", "10", "--cp-sizes", "3"],
    "evaluate: damaged checkpoint": ["tools/evaluate.py", "--load", "{damaged}", "--task", "recall", "--seq-length", "32"],
    "generate: damaged checkpoint": ["tools/generate.py", "--load", "{damaged}", "--prompt-ids", "1 2 3"],
    "convert_to_hf: damaged checkpoint": ["tools/checkpoint/convert_to_hf.py", "--load", "{damaged}", "--output", "{root}/hf"],
    "convert_from_hf: not a model": ["tools/checkpoint/convert_from_hf.py", "--load", "{root}", "--save", "{root}/m"],
    "import_official_v1: not a checkpoint": ["tools/checkpoint/import_official_v1.py", "--input", "{file}",
                                             "--output", "{root}/imported"],
    "pretrain_mosaic: bad argument": ["pretrain_mosaic.py", *MOCK, "--num-attention-heads", "3"],
    "pretrain_mosaic: --save under a file": ["pretrain_mosaic.py", *MOCK, "--train-iters", "2", "--save", "{under_file}"],
    "pretrain_mosaic: damaged checkpoint": ["pretrain_mosaic.py", *MOCK, "--train-iters", "4", "--load", "{damaged}"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_error_line(places, case):
    argv = [a.format(**places) for a in CASES[case]]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), f"{case}: exit {proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, f"{case}:\n{out[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, f"{case}:\n{proc.stderr[-3000:]}"
    others = [line for line in out.splitlines() if "error" in line.lower() and line not in errors]
    assert others == [], f"{case}: more error lines {others}"


def test_pretrain_user_error_once_under_torchrun(places, tmp_path):
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "2", "--save", places["under_file"]],
                  str(tmp_path / "log"))
    assert job.returncode != 0
    assert [line for line in job.output.splitlines() if line.startswith("ERROR:")] == [
        f"ERROR: --save {places['under_file']}: cannot create the directory (Not a directory)"], job.output[-3000:]
    assert f'File "{REPO}/megatron_mosaic' not in job.output
    assert job.left == []


def test_bugs_keep_their_traceback():
    """Only user errors become one line: anything else is re-raised with its traceback."""
    from megatron_mosaic.errors import is_user_error
    from megatron_mosaic.training.faults import report_error
    from tools._cli import run_tool

    def bug() -> int:
        raise KeyError("an internal bug")

    with pytest.raises(KeyError):
        run_tool(bug, "tool")
    assert not report_error(AttributeError("x")) and not report_error(ValueError("x"))
    assert not is_user_error(RuntimeError("x"))
    assert is_user_error(FileNotFoundError(2, "No such file or directory", "/x"))
    assert is_user_error(OSError(28, "No space left on device"))

    def user() -> int:
        raise FileNotFoundError(2, "No such file or directory", "/missing")

    assert run_tool(user, "tool") == 1
