"""tools/evaluate.py on tiny v1, v2 and GPT checkpoints (Megatron and HF) on every task at two lengths."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_mosaic.evaluation import TASKS, Document, generate_documents
from megatron_mosaic.evaluation.model_runner import encode_document, load_model
from megatron_mosaic.evaluation.run import evaluate_length
from tests.evaluation.conftest import MODELS, TRAIN_LENGTH
from tools import evaluate

LENGTHS = (TRAIN_LENGTH, 2 * TRAIN_LENGTH)


def run_evaluate(load: str, out_dir, text: str, capsys) -> dict[str, dict]:
    """Every task in one call (the model is loaded once); task -> its results."""
    argv = ["--load", load, "--task", *TASKS, "--seq-length", *map(str, LENGTHS), "--num-docs", "2",
            "--batch-size", "2", "--output", str(out_dir), "--text", text]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    found = {}
    for task in TASKS:
        assert f" {task} " in printed and "params" in printed
        for suffix in (".json", ".csv", "_vs_length.png", "_per_position.png"):
            assert (out_dir / f"{task}{suffix}").stat().st_size > 0
        [found[task]] = json.loads((out_dir / f"{task}.json").read_text())
    return found


@pytest.mark.parametrize("model", MODELS)
def test_every_task_at_two_lengths_megatron_and_hf_agree(model, tiny_checkpoints, small_text, tmp_path, capsys):
    got = {source: run_evaluate(tiny_checkpoints[model][source], tmp_path / source, small_text, capsys)
           for source in ("megatron", "hf")}
    for task, spec in TASKS.items():
        for source in ("megatron", "hf"):
            res = got[source][task]
            assert res["model"] == model and res["train_seq_length"] == TRAIN_LENGTH and res["parameters"] > 0
            assert [at["length"] for at in res["lengths"]] == list(LENGTHS)
            for at in res["lengths"]:
                assert at["mean_document_tokens"] == at["length"]  # ids format: exact lengths
                assert at["per_position"][-1]["last"] == at["length"] - 1
                if spec.grouping:
                    assert at["summary"]["n"] > 0 and 0.0 <= at["summary"]["accuracy"] <= 1.0
                    assert set(at["summary"]["by"]) == set(spec.grouping)
        # The in-memory conversion and the exported directory are the same model.
        for a, b in zip(got["megatron"][task]["lengths"], got["hf"][task]["lengths"]):
            assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-5)
            if spec.grouping:
                assert a["summary"]["accuracy"] == b["summary"]["accuracy"]
                assert a["summary"]["mean_logprob"] == pytest.approx(b["summary"]["mean_logprob"], rel=1e-5)


@pytest.mark.parametrize("options", [{}, {"num_pairs": 2, "query_order": "random"}])
def test_scores_match_the_models_own_loss_and_argmax(tiny_checkpoints, small_text, options):
    """Per-position loss = the HF model's own cross-entropy; an answer's log-likelihood and
    correctness = what the logits say at the token before it. Generator options reach the
    documents scored."""
    loaded = load_model(tiny_checkpoints["mosaic-v2"]["hf"])
    result = evaluate_length(loaded, "recall", 48, 3, 0, None, 3, log=lambda m: None, options=options)
    docs = [encode_document(d, loaded.encode, 48)
            for d in generate_documents("recall", loaded.vocab, 48, 3, 0, **options)]
    ids = torch.tensor([d.ids for d in docs])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, labels=ids)
    assert result["mean_loss"] == pytest.approx(float(out.loss), rel=1e-5)
    logprobs = torch.log_softmax(out.logits.float(), -1)
    expected_correct, expected_logprob = [], []
    for row, doc in enumerate(docs):
        for start, end, _ in doc.answers:
            expected_correct.append(int(out.logits[row, start - 1].argmax()) == doc.ids[start])
            expected_logprob.append(float(logprobs[row, start - 1, doc.ids[start]]))
    summary = result["summary"]
    assert summary["n"] == len(expected_correct)
    assert summary["accuracy"] == pytest.approx(sum(expected_correct) / len(expected_correct))
    assert summary["mean_logprob"] == pytest.approx(sum(expected_logprob) / len(expected_logprob), rel=1e-5)


def test_recall_options_reach_the_documents_and_not_other_tasks(tiny_checkpoints, tmp_path, capsys):
    """--num-pairs / --query-order change recall's documents (2 pairs leave room for more queries
    than the default quarter of the length) and are recorded; fewshot in the same run is untouched;
    the registry is left as it was."""
    generate = TASKS["recall"].generate
    runs = {}
    for name, extra in (("default", []), ("options", ["--num-pairs", "2", "--query-order", "random"])):
        argv = ["--load", tiny_checkpoints["mosaic-v2"]["megatron"], "--task", "recall", "fewshot",
                "--seq-length", "32", "--num-docs", "2", "--output", str(tmp_path / name), *extra]
        assert evaluate.main(argv) == 0, capsys.readouterr().err
        runs[name] = {task: json.loads((tmp_path / name / f"{task}.json").read_text())[0]
                      for task in ("recall", "fewshot")}
    default, options = runs["default"]["recall"], runs["options"]["recall"]
    assert default["lengths"][0]["summary"]["n"] == 2 * (32 - 2 * 8) // 2  # 8 pairs: length // 4
    assert options["lengths"][0]["summary"]["n"] == 2 * (32 - 2 * 2) // 2
    assert (options["num_pairs"], options["query_order"]) == (2, "random")
    assert "num_pairs" not in default and "query_order" not in default
    untimed = lambda res: [{k: v for k, v in at.items() if k != "seconds"} for at in res["lengths"]]  # noqa: E731
    assert untimed(runs["default"]["fewshot"]) == untimed(runs["options"]["fewshot"])
    assert "num_pairs" not in runs["options"]["fewshot"]
    assert TASKS["recall"].generate is generate


def test_recall_options_fail_in_one_line(tiny_checkpoints, capsys):
    """Options for tasks that take none fail before loading; a --num-pairs that does not fit the
    length fails when recall's first document is drawn (after the line saying what was loaded)."""
    load = tiny_checkpoints["mosaic-v2"]["megatron"]
    for extra, message in (
            (["--task", "fewshot", "--num-pairs", "2"],
             "--num-pairs is recall's and must be >= 1, got 2 for --task fewshot"),
            (["--task", "fewshot", "--query-order", "random"], "--query-order is recall's, got it for --task fewshot"),
            (["--task", "recall", "--num-pairs", "20"],
             "--num-pairs must be in [1, 15] for recall documents of 32 units with 23 symbols, got 20")):
        assert evaluate.main(["--load", load, "--seq-length", "32", *extra]) != 0
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loaded ")]
        assert err == [f"evaluate: error: {message}"], err


def test_text_tokenizer_segments_are_exact_and_cut_at_segment_boundaries(tmp_path):
    from tests.hf.helpers import train_tiny_sentencepiece
    from transformers import AutoTokenizer  # noqa: F401  (the tokenizer wrapper needs transformers)

    from megatron_mosaic.hf.tokenization_memory_mosaic import MemoryMosaicTokenizer

    tok = MemoryMosaicTokenizer(train_tiny_sentencepiece(str(tmp_path / "spm")))
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    doc = Document("recall")
    doc.add("K1 V2 K3 V4 K1".split())
    doc.add(["V2"], {"query": 0, "distance": 4})
    doc.add(["K3"])
    doc.add(["V4"], {"query": 1, "distance": 4})
    full = encode_document(doc, encode, 10_000)
    assert [full.ids[s:e] for s, e, _ in full.answers] == [encode("V2"), encode("V4")]
    cut = encode_document(doc, encode, full.answers[1][0])  # room for everything but the last answer
    assert cut.ids == full.ids[:full.answers[1][0]] and len(cut.answers) == 1


def test_bad_load_is_one_line(tmp_path, capsys):
    assert evaluate.main(["--load", str(tmp_path), "--task", "recall", "--seq-length", "32"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error:"), err
    assert evaluate.main(["--load", str(tmp_path / "x"), "--task", "recall", "--seq-length", "4"]) != 0
    assert "--seq-length values must be >= 8" in capsys.readouterr().err
    assert evaluate.main(["--load", str(tmp_path), "--task", "recall", "lm", "--seq-length", "32"]) != 0
    assert "--task lm needs real text" in capsys.readouterr().err


def test_icl_report_puts_every_model_in_one_report(tiny_checkpoints, tmp_path, capsys):
    from examples import icl_report

    runs = tmp_path / "runs"
    for model in ("mosaic-v2", "gpt"):
        argv = ["--load", tiny_checkpoints[model]["megatron"], "--task", "fewshot", "--seq-length", "32", "64",
                "--num-docs", "1", "--name", model, "--output", str(runs / model / "eval")]
        assert evaluate.main(argv) == 0
        (runs / model / "train.log").write_text(" final | iteration 2 | validation loss 4.5000 | "
                                                "training tokens/s 1,234 (mean over 2 iterations)\n")
    assert icl_report.main(["--runs", str(runs), "--models", "mosaic-v2", "gpt"]) == 0
    report = (runs / "report.md").read_text()
    assert "| mosaic-v2 |" in report and "| gpt |" in report and "| 4.5000 | 1,234 |" in report
    assert "![fewshot](fewshot_by_shot.png)" in report and (runs / "fewshot_by_shot.png").stat().st_size > 0
    [v2, gpt] = json.loads((runs / "fewshot.json").read_text())
    assert (v2["name"], gpt["name"]) == ("mosaic-v2", "gpt")
    assert f"mosaic-v2 ({v2['parameters'] / 1e6:.2f}M params)" in report
    assert icl_report.main(["--runs", str(tmp_path / "none"), "--models", "gpt"]) != 0
