"""tools/make_eval_data.py: documents that tools/preprocess_data.py turns into training data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mosaic.evaluation import read_documents

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "make_eval_data.py")


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["nope", "--output", "x.jsonl", "--vocab-size", "100"], "unknown task 'nope'"),
    (["recall", "--output", "x.jsonl"], "--vocab-size must be >= 32"),
    (["recall", "--output", "x.jsonl", "--vocab-size", "100", "--num-docs", "0"], "--num-docs must be >= 1"),
    (["lm", "--output", "x.jsonl", "--vocab-size", "100"], "task lm needs real text"),
    (["recall", "--output", "x.jsonl", "--vocab-size", "100", "--num-symbols", "3"], "--num-symbols must be in [4, 23]"),
    (["lm", "--output", "x.jsonl", "--vocab-size", "100", "--text", "missing.jsonl"], "--text missing.jsonl: no such file"),
    (["lm", "--lm-eval", "--output", "x.jsonl", "--vocab-size", "100"], "--lm-eval writes rows for recall and fewshot"),
    (["recall", "--format", "text", "--output", "x.jsonl", "--ids-tokenizer", "tok"], "--ids-tokenizer is NullTokenizer's"),
])
def test_bad_arguments_give_one_line(tmp_path, argv, message):
    result = run(TOOL, *argv, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_eval_data: error:") and message in lines[0], result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_generated_documents_preprocess_with_null_tokenizer(tmp_path):
    out = tmp_path / "recall.jsonl"
    result = run(TOOL, "recall", "--output", str(out), "--num-docs", "5", "--length", "30",
                 "--vocab-size", "100", "--seed", "4")
    assert result.returncode == 0, result.stderr
    docs = list(read_documents(str(out)))
    assert len(docs) == 5 and all(d.num_units == 30 for d in docs)
    prefix = tmp_path / "recall"
    result = run(str(ROOT / "tools" / "preprocess_data.py"), "--input", str(out), "--output-prefix", str(prefix),
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--append-eod", "--workers", "1")
    assert result.returncode == 0, result.stderr
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix) + "_text_document")
    assert len(dataset) == 5
    for i, doc in enumerate(docs):
        assert dataset[i].tolist() == [int(u) for u in doc.text.split()] + [100]  # EOD = N


@pytest.mark.parametrize("pairs, message", [
    ("0", "--num-pairs must be in [1, 11] for recall documents of 24 units with 32 symbols, got 0"),
    ("12", "--num-pairs must be in [1, 11] for recall documents of 24 units with 32 symbols, got 12"),
])
def test_bad_num_pairs_give_one_line(tmp_path, pairs, message):
    result = run(TOOL, "recall", "--output", "x.jsonl", "--vocab-size", "512", "--num-symbols", "32",
                 "--length", "24", "--num-pairs", pairs, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines == [f"make_eval_data: error: {message}"], result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_num_pairs_is_recall_only(tmp_path):
    result = run(TOOL, "fewshot", "--output", "x.jsonl", "--vocab-size", "512", "--num-pairs", "4", cwd=tmp_path)
    assert result.returncode != 0 and "--num-pairs is recall's, not fewshot's" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("pairs", [1, 4, 8])
def test_recall_documents_hold_exactly_num_pairs(pairs):
    """The documents `examples/icl_baseline.sh` trains on with BASELINE_PAIRS: N distinct keys
    with their values, then only queries of those keys, each answered with its pair's value."""
    import random

    from megatron_mosaic.evaluation import SymbolVocab
    from megatron_mosaic.evaluation.synthetic import recall_document

    vocab = SymbolVocab("ids", 512, 32)
    for seed in range(20):
        doc = recall_document(random.Random(seed), vocab, 127, num_pairs=pairs)
        ids = doc.text.split()
        keys, values = ids[0:2 * pairs:2], ids[1:2 * pairs:2]
        assert doc.meta["pairs"] == pairs and len(set(keys)) == pairs
        answer_of = dict(zip(keys, values))
        queries = [(doc.segments[i - 1].text.split()[-1], s.text)  # (the key just before, the answer)
                   for i, s in enumerate(doc.segments) if s.answer is not None]
        assert len(queries) == (127 - 2 * pairs) // 2  # the rest of the document is queries
        assert all(answer_of[k] == v for k, v in queries)


def test_random_query_order_breaks_the_rounds_and_leaves_the_default_alone(tmp_path):
    """``query_order="random"`` draws each query's key uniformly (so keys repeat within a round of
    len(keys) queries, which the default permutation walk never does), keeps every answer and
    ``distance`` right, and the default stays the rounds walk; the CLI passes the option on."""
    import random

    from megatron_mosaic.evaluation import SymbolVocab, VocabError
    from megatron_mosaic.evaluation.synthetic import recall_document

    vocab, pairs = SymbolVocab("ids", 512, 32), 4

    def queries(doc):
        ids = doc.text.split()
        answer_of = dict(zip(ids[0:2 * pairs:2], ids[1:2 * pairs:2]))
        out, position = [], 0
        for s in doc.segments:
            if s.answer is not None:
                key = ids[position - 1]
                assert answer_of[key] == s.text
                seen = max(q for q in range(position - 1) if ids[q] == key and q % 2 == 0)
                assert s.answer["distance"] == position - 1 - seen
                out.append(key)
            position += len(s.text.split())
        return out

    repeats_in_a_round = {"rounds": 0, "random": 0}
    for order in repeats_in_a_round:
        for seed in range(10):
            keys = queries(recall_document(random.Random(seed), vocab, 127, num_pairs=pairs, query_order=order))
            rounds = [keys[i:i + pairs] for i in range(0, len(keys) - pairs + 1, pairs)]
            repeats_in_a_round[order] += sum(len(set(r)) < pairs for r in rounds)
    assert repeats_in_a_round["rounds"] == 0 and repeats_in_a_round["random"] > 50
    default = recall_document(random.Random(3), vocab, 24, num_pairs=pairs)  # the output before query_order existed
    assert default.text == "23 44 16 40 31 70 38 56 31 70 38 56 23 44 16 40 16 40 23 44 31 70 38 56"
    assert default.text == recall_document(random.Random(3), vocab, 24, num_pairs=pairs, query_order="rounds").text
    with pytest.raises(VocabError, match="--query-order must be one of rounds, random"):
        recall_document(random.Random(3), vocab, 127, query_order="recent")
    out = tmp_path / "r.jsonl"
    result = run(TOOL, "recall", "--output", str(out), "--num-docs", "1", "--length", "127", "--vocab-size", "512",
                 "--num-symbols", "32", "--num-pairs", "4", "--seed", "5", "--query-order", "random")
    assert result.returncode == 0 and "random query order" in result.stdout, result.stderr
    from megatron_mosaic.evaluation.tasks import document_rng

    [doc] = read_documents(str(out))
    assert doc.text == recall_document(document_rng(5, "recall", 127, 0), vocab, 127, num_pairs=4,
                                       query_order="random").text
