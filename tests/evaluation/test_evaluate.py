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


def run_evaluate(load: str, task: str, out_dir, text: str, capsys) -> list[dict]:
    argv = ["--load", load, "--task", task, "--seq-length", *map(str, LENGTHS), "--num-docs", "2",
            "--batch-size", "2", "--output", str(out_dir)]
    if TASKS[task].needs_text:
        argv += ["--text", text]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert f"{task}" in table and "params" in table
    for suffix in (".json", ".csv", "_vs_length.png", "_per_position.png"):
        assert (out_dir / f"{task}{suffix}").stat().st_size > 0
    return json.loads((out_dir / f"{task}.json").read_text())


@pytest.mark.parametrize("model", MODELS)
def test_every_task_at_two_lengths_megatron_and_hf_agree(model, tiny_checkpoints, small_text, tmp_path, capsys):
    for task, spec in TASKS.items():
        got = {}
        for source in ("megatron", "hf"):
            [res] = run_evaluate(tiny_checkpoints[model][source], task, tmp_path / source, small_text, capsys)
            assert res["model"] == model and res["train_seq_length"] == TRAIN_LENGTH and res["parameters"] > 0
            assert [at["length"] for at in res["lengths"]] == list(LENGTHS)
            for at in res["lengths"]:
                assert at["mean_document_tokens"] == at["length"]  # ids format: exact lengths
                assert at["per_position"][-1]["last"] == at["length"] - 1
                if spec.grouping:
                    assert at["summary"]["n"] > 0 and 0.0 <= at["summary"]["accuracy"] <= 1.0
                    assert set(at["summary"]["by"]) == set(spec.grouping)
            got[source] = res
        # The in-memory conversion and the exported directory are the same model.
        for a, b in zip(got["megatron"]["lengths"], got["hf"]["lengths"]):
            assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-5)
            if spec.grouping:
                assert a["summary"]["accuracy"] == b["summary"]["accuracy"]
                assert a["summary"]["mean_logprob"] == pytest.approx(b["summary"]["mean_logprob"], rel=1e-5)


def test_scores_match_the_models_own_loss_and_argmax(tiny_checkpoints, small_text):
    """Per-position loss = the HF model's own cross-entropy; an answer's log-likelihood and
    correctness = what the logits say at the token before it."""
    loaded = load_model(tiny_checkpoints["mosaic-v2"]["hf"])
    result = evaluate_length(loaded, "recall", 48, 3, 0, None, 3, log=lambda m: None)
    docs = [encode_document(d, loaded.encode, 48) for d in generate_documents("recall", loaded.vocab, 48, 3, 0)]
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
