"""lm-evaluation-harness on tiny exported v1, v2 and GPT models, with the shipped task definitions.

lm_eval's own ``hf`` model loads the export (its code through trust_remote_code) and the
NullTokenizer written by ``tools/make_eval_data.py --ids-tokenizer``; the rows come from our
generators (``--lm-eval``) as local jsonl, read through ``dataset_path: json`` with the hub off.
Every per-choice log-likelihood and greedy flag (loglikelihood tasks) and every generated first
word (generate_until) is checked against our own scorer on the same model, and the aggregate
scores against those per-row results, so a wrong tokenizer, truncation or offset fails here.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mosaic.evaluation import Document
from megatron_mosaic.evaluation.model_runner import encode_document, load_model, score_batch
from megatron_mosaic.evaluation.scoring import PositionLoss
from tests.evaluation.conftest import ROOT, VOCAB
from tools import make_eval_data

TASKS_DIR = str(ROOT / "megatron_mosaic" / "evaluation" / "lm_eval_tasks")
TASKS = ("mosaic_recall", "mosaic_fewshot", "mosaic_recall_gen")
LENGTH = 24  # units per document: every context fits max_length below, nothing is truncated
MAX_LENGTH = 64

# simple_evaluate for several exports in one process (lm_eval's import dominates a run's time).
API_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
out = {}
for name, export in json.loads(sys.argv[1]).items():
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},tokenizer=ids_tokenizer,"
                                  f"trust_remote_code=True,max_length=%d", tasks=%r, batch_size=4, device="cpu",
                                  log_samples=True, task_manager=TaskManager(include_path=%r))
    out[name] = {"results": res["results"], "samples": res["samples"]}
json.dump(out, open("api_results.json", "w"), default=str)
""" % (MAX_LENGTH, list(TASKS), TASKS_DIR)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where lm_eval runs: the task YAMLs name data/lm_eval/*.jsonl relative to it."""
    work = tmp_path_factory.mktemp("lm_eval")
    for task in ("recall", "fewshot"):
        argv = [task, "--lm-eval", "--output", str(work / "data" / "lm_eval" / f"{task}.jsonl"), "--num-docs", "6",
                "--length", str(LENGTH), "--vocab-size", str(VOCAB), "--seed", "5"]
        if task == "recall":
            argv += ["--ids-tokenizer", str(work / "ids_tokenizer")]
        assert make_eval_data.main(argv) == 0
    return work


def run(cmd: list[str], cwd) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(cwd / "datasets_cache"),
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def our_choice_scores(loaded, context: str, choices: list[str]) -> list[tuple[float, bool]]:
    """(log-likelihood, argmax-correct) of each choice after the context, by our own scorer."""
    docs = []
    for choice in choices:
        doc = Document("choice")
        doc.add(context.split())
        doc.add([choice], {})
        docs.append(encode_document(doc, loaded.encode, 10 ** 6))
    return [(r.logprob, r.correct) for r in score_batch(loaded, docs, "choice", PositionLoss())]


def check_against_our_scorer(export: str, results: dict, samples: dict) -> None:
    loaded = load_model(export)
    tokenizer_size = VOCAB + 1  # ids 0..VOCAB-1 and EOD: generation never emits a padded id
    for task in ("mosaic_recall", "mosaic_fewshot"):
        right = []
        for sample in samples[task]:
            doc = sample["doc"]
            got = [(float(resp[0][0]), str(resp[0][1]) == "True") for resp in sample["resps"]]
            expected = our_choice_scores(loaded, doc["context"], doc["choices"])
            assert [g for _, g in got] == [c for _, c in expected], (task, sample["doc_id"])
            assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
            right.append(max(range(len(expected)), key=lambda i: expected[i][0]) == doc["label"])
        assert len(right) == 6 and results[task]["acc,none"] == pytest.approx(sum(right) / len(right))
    matches = []
    for sample in samples["mosaic_recall_gen"]:
        doc = sample["doc"]
        ids = torch.tensor([loaded.encode(doc["context"])])
        with torch.no_grad():
            first = int(loaded.model(input_ids=ids).logits[0, -1, :tokenizer_size].argmax())
        word = str(first) if first < VOCAB else "[invalid]"  # EOD ends generation: nothing generated
        assert sample["filtered_resps"][0] == word, (sample["doc_id"], sample["resps"])
        matches.append(word == doc["answer"])
    assert results["mosaic_recall_gen"]["exact_match,first_word"] == pytest.approx(sum(matches) / len(matches))


def test_lm_eval_cli_on_exported_mosaic_v2(tiny_checkpoints, workdir):
    """The command the README documents, as a user runs it."""
    export = tiny_checkpoints["mosaic-v2"]["hf"]
    run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={export},tokenizer=ids_tokenizer,trust_remote_code=True,max_length={MAX_LENGTH}",
         "--tasks", ",".join(TASKS), "--include_path", TASKS_DIR, "--device", "cpu", "--batch_size", "4",
         "--output_path", "cli_out", "--log_samples"], workdir)
    [results_file] = glob.glob(str(workdir / "cli_out" / "*" / "results_*.json"))
    results = json.load(open(results_file))["results"]
    samples = {}
    for task in TASKS:
        [path] = glob.glob(str(workdir / "cli_out" / "*" / f"samples_{task}_2*.jsonl"))
        samples[task] = [json.loads(line) for line in open(path)]
    check_against_our_scorer(export, results, samples)


def test_lm_eval_api_on_exported_v1_and_gpt(tiny_checkpoints, workdir):
    exports = {model: tiny_checkpoints[model]["hf"] for model in ("mosaic-v1", "gpt")}
    run([sys.executable, "-c", API_SCRIPT, json.dumps(exports)], workdir)
    out = json.load(open(workdir / "api_results.json"))
    for model, export in exports.items():
        check_against_our_scorer(export, out[model]["results"], out[model]["samples"])


def test_row_is_the_last_answer_with_the_documents_answers_as_choices():
    from megatron_mosaic.evaluation.lm_eval_data import lm_eval_row

    doc = Document("recall")
    doc.add("8 40 9 41 10 40 9".split())
    doc.add(["41"], {"query": 0, "distance": 6})
    doc.add(["8"])
    doc.add(["40"], {"query": 1, "distance": 10})
    doc.add(["1", "1"])  # filler after the last query is not part of any row
    row = lm_eval_row(doc).to_json()
    assert row == {"context": "8 40 9 41 10 40 9 41 8", "answer": "40", "choices": ["40", "41"], "label": 0,
                   "task": "recall", "fields": {"query": 1, "distance": 10}}
    assert lm_eval_row(Document("recall", [])) is None


def test_ids_tokenizer_is_null_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from megatron_mosaic.evaluation.lm_eval_data import write_ids_tokenizer

    tok = AutoTokenizer.from_pretrained(write_ids_tokenizer(VOCAB, str(tmp_path / "tok")))
    assert tok("12 7  99", add_special_tokens=False)["input_ids"] == [12, 7, 99]
    assert tok.eos_token_id == VOCAB and tok.pad_token_id == VOCAB and len(tok) == VOCAB + 1
    assert tok("hello 3", add_special_tokens=False)["input_ids"] == [0, 3]  # the ids layout's unknown marker
    assert tok.decode([12, 7, 99]) == "12 7 99"
