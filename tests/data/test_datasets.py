"""GPTDatasets through BlendedMegatronDatasetBuilder, blends, splits, resumable micro-batches."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch

from megatron_mosaic.data import preprocess
from megatron_mosaic.data.corpus import DataError
from megatron_mosaic.data.datasets import build_train_valid_test_datasets, parse_blend
from megatron_mosaic.data.loader import PretrainingSampler, build_data_loader
from megatron_mosaic.data.tokenizers import TokenizerSpec, build_tokenizer
from tests.data.conftest import write_jsonl
from tests.distributed import run_distributed

SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, documents, sp_model):
    """Two datasets (halves of the corpus) preprocessed with --append-eod, and the tokenizer."""
    root = tmp_path_factory.mktemp("datasets")
    prefixes = []
    for name, docs in (("a", documents[:30]), ("b", documents[30:])):
        jsonl = write_jsonl(str(root / f"{name}.jsonl"), docs)
        assert preprocess.main(["--input", jsonl, "--output-prefix", str(root / name), "--append-eod",
                                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 0
        prefixes.append(str(root / f"{name}_text_document"))
    tok = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", tokenizer_model=sp_model))
    return types.SimpleNamespace(root=root, a=prefixes[0], b=prefixes[1], tokenizer=tok, sp_model=sp_model)


def args(tmp_path, **kw):
    return types.SimpleNamespace(data_cache_path=str(tmp_path / "cache"), **kw)


def test_samples_are_windows_of_packed_documents(tmp_path, data):
    train, valid, test = build_train_valid_test_datasets(
        args(tmp_path, data_path=[data.a], split="80,10,10"), data.tokenizer, SEQ, 1234, [50, 5, 5])
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5
    eod = data.tokenizer.eod
    for ds in (train, valid):
        # The packed stream megatron-core draws from: documents in its (shuffled) document order.
        stream = np.concatenate([ds.dataset.get(int(d)) for d in ds.document_index])
        ends = np.cumsum([len(ds.dataset.get(int(d))) for d in ds.document_index]) - 1
        assert np.array_equal(np.flatnonzero(stream == eod), ends)  # EOD exactly at document ends
        for j in range(len(ds)):
            k = int(ds.shuffle_index[j])
            sample = ds[j]
            assert torch.equal(sample["tokens"], torch.from_numpy(stream[k * SEQ:(k + 1) * SEQ].astype(np.int64)))
            assert torch.equal(sample["labels"], torch.from_numpy(stream[k * SEQ + 1:(k + 1) * SEQ + 1].astype(np.int64)))
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert torch.all(sample["loss_mask"] == 1)
            assert "attention_mask" not in sample
    # Splits are disjoint ranges of documents.
    assert not set(train.indices) & set(valid.indices) and not set(valid.indices) & set(test.indices)


def test_weighted_blend_and_per_split_paths(tmp_path, data):
    train, valid, _ = build_train_valid_test_datasets(
        args(tmp_path, data_path=[f"0.7 {data.a} 0.3 {data.b}"], split="90,10,0"), data.tokenizer, SEQ, 7, [200, 20, 0])
    ids = np.array([train[i]["dataset_id"].item() for i in range(len(train))])
    assert len(train) == 200 and abs((ids == 0).sum() - 140) <= 1 and abs((ids == 1).sum() - 60) <= 1

    same = build_train_valid_test_datasets(
        args(tmp_path, data_path=["0.7", data.a, "0.3", data.b], split="90,10,0"), data.tokenizer, SEQ, 7, [200, 20, 0])
    assert torch.equal(same[0][5]["tokens"], train[5]["tokens"])

    train, valid, test = build_train_valid_test_datasets(
        args(tmp_path, train_data_path=[data.a], valid_data_path=[data.b]), data.tokenizer, SEQ, 7, [30, None, None])
    assert test is None
    assert set(valid.indices) == set(range(30))  # the whole of b, one epoch
    assert valid.dataset.path_prefix == data.b and train.dataset.path_prefix == data.a


def test_parse_blend():
    assert parse_blend(["A"]) == (["A"], None)
    assert parse_blend(["A", "B"]) == (["A", "B"], None)
    assert parse_blend(["0.7 A 0.3 B"]) == (["A", "B"], [0.7, 0.3])
    assert parse_blend(["0.7", "A", "0.3", "B"]) == (["A", "B"], [0.7, 0.3])
    assert parse_blend(None) is None and parse_blend([]) is None
    with pytest.raises(DataError, match="expected 'WEIGHT PREFIX' pairs, got 3 items"):
        parse_blend(["0.7", "A", "B"])
    with pytest.raises(DataError, match="'B' is not a weight"):
        parse_blend(["0.7", "A", "B", "C"])
    with pytest.raises(DataError, match="weights must come first"):
        parse_blend(["A", "0.3"])


def test_data_errors(tmp_path, data, caplog):
    tok = data.tokenizer
    with pytest.raises(DataError, match=r"--data-path: no dataset .*a_text_document\.bin\.bin/\.idx \(give the prefix without the suffix"):
        build_train_valid_test_datasets(args(tmp_path, data_path=[data.a + ".bin"]), tok, SEQ, 1, [1, 1, 1])
    with pytest.raises(DataError, match="the test split of .* gets none of its 30 sequences"):
        build_train_valid_test_datasets(args(tmp_path, data_path=[data.a], split="949,50,1"), tok, SEQ, 1, [1, 1, 1])
    # Asked for no particular number of samples, an empty split is just an empty dataset.
    _, _, test = build_train_valid_test_datasets(args(tmp_path, data_path=[data.a], split="949,50,1"), tok, SEQ, 1, [1, 1, None])
    assert len(test) == 0
    with pytest.raises(DataError, match="no training data"):
        build_train_valid_test_datasets(args(tmp_path), tok, SEQ, 1, [1, 1, 1])
    with pytest.raises(DataError, match="cannot be combined"):
        build_train_valid_test_datasets(args(tmp_path, data_path=[data.a], valid_data_path=[data.b]), tok, SEQ, 1, [1, 1, 1])

    # A dataset from another tokenizer (ids beyond this vocabulary), and one without EODs.
    foreign = str(tmp_path / "foreign")
    writer = preprocess.AtomicIndexedWriter(foreign, np.int32)
    writer.add_document(np.array([5, tok.vocab_size + 7, 3], dtype=np.int32), [3])
    writer.commit()
    with pytest.raises(DataError, match=f"holds token id {tok.vocab_size + 7}, beyond the tokenizer's vocab size"):
        build_train_valid_test_datasets(args(tmp_path, train_data_path=[foreign]), tok, SEQ, 1, [1, None, None])
    no_eod = str(tmp_path / "no_eod")
    writer = preprocess.AtomicIndexedWriter(no_eod, np.uint16)
    for _ in range(8):
        writer.add_document(np.arange(10, 30, dtype=np.uint16), [20])
    writer.commit()
    with caplog.at_level(logging.WARNING, logger="megatron_mosaic.data.datasets"):
        build_train_valid_test_datasets(args(tmp_path, train_data_path=[no_eod]), tok, SEQ, 1, [4, None, None])
    assert "ends with the EOD id" in caplog.text


def test_mock_data(tmp_path, data):
    train, valid, _ = build_train_valid_test_datasets(args(tmp_path, mock_data=True), data.tokenizer, SEQ, 3, [8, 2, 0])
    assert len(train) >= 8 and int(train[0]["tokens"].max()) < data.tokenizer.vocab_size


def test_sampler_resumes_exactly_and_splits_data_parallel():
    full = list(PretrainingSampler(40, 0, 2, 0, 1))
    assert full == [[2 * i, 2 * i + 1] for i in range(20)]
    # Data parallel: rank r takes the r-th micro-batch slice of each global micro-batch.
    ranks = [list(PretrainingSampler(40, 0, 2, r, 3)) for r in range(3)]
    assert all(len(r) == 6 for r in ranks) and len(PretrainingSampler(40, 0, 2, 0, 3)) == 6
    for step in range(6):
        assert sum((ranks[r][step] for r in range(3)), []) == list(range(6 * step, 6 * step + 6))
    # Resuming after k global batches gives the rest of the uninterrupted sequence.
    assert list(PretrainingSampler(40, 12, 2, 1, 3)) == ranks[1][2:]
    # Without drop_last the ragged tail is shared out in order, empty slices are not yielded.
    tail = [list(PretrainingSampler(40, 36, 2, r, 3, drop_last=False)) for r in range(3)]
    assert tail == [[[36, 37]], [[38, 39]], []]
    assert [len(PretrainingSampler(40, 36, 2, r, 3, drop_last=False)) for r in range(3)] == [1, 1, 0]
    with pytest.raises(ValueError, match="consumed_samples 41"):
        PretrainingSampler(40, 41, 2)


def test_data_loader_resume_matches_uninterrupted_run(tmp_path, data):
    train, _, _ = build_train_valid_test_datasets(
        args(tmp_path, data_path=[data.a], split="90,10,0"), data.tokenizer, SEQ, 5, [40, 2, 0])
    uninterrupted = [b["tokens"] for _, b in zip(range(6), build_data_loader(train, 0, 4))]
    resumed = [b["tokens"] for _, b in zip(range(3), build_data_loader(train, 12, 4))]
    assert all(t.shape == (4, SEQ) for t in uninterrupted)
    assert all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted[3:]))
    assert build_data_loader(None, 0, 4) is None


def _build_on_ranks(rank, world_size, prefix, sp_model, cache):
    tok = build_tokenizer(TokenizerSpec("SentencePieceTokenizer", tokenizer_model=sp_model))
    ns = types.SimpleNamespace(data_path=[prefix], split="90,10,0", data_cache_path=cache)
    train, valid, _ = build_train_valid_test_datasets(ns, tok, SEQ, 11, [24, 4, 0])
    loader = build_data_loader(train, 0, 2, rank, world_size)
    return {"len": len(train), "first": train[0]["tokens"], "batches": [b["tokens"] for _, b in zip(range(3), loader)]}


def test_two_ranks_share_one_cache_and_split_batches(tmp_path, data):
    results = run_distributed(_build_on_ranks, 2, data.a, data.sp_model, str(tmp_path / "shared_cache"))
    assert results[0]["len"] == results[1]["len"]
    assert torch.equal(results[0]["first"], results[1]["first"])
    local, _, _ = build_train_valid_test_datasets(
        args(tmp_path, data_path=[data.a], split="90,10,0"), data.tokenizer, SEQ, 11, [24, 4, 0])
    for step in range(3):
        # Global micro-batch `step` (4 samples) = rank 0's two samples then rank 1's two.
        expected = torch.stack([local[i]["tokens"] for i in range(4 * step, 4 * step + 4)])
        assert torch.equal(torch.cat([results[0]["batches"][step], results[1]["batches"][step]]), expected)
