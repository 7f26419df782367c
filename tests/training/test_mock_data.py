"""--mock-data is Megatron's MockGPTDataset: documents of random length holding ids 1, 2, 3, ...
(modulo the vocabulary), each ending in EOD, sampled into sequences like a real corpus."""

from __future__ import annotations

import pytest

from megatron_mosaic.training.arguments import parse_args


def test_mock_data_follows_megatron_mock_gpt_dataset():
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    from megatron_mosaic.training.data import build_data

    args = parse_args(["--mock-data", "--vocab-size", "64", "--seq-length", "64", "--train-iters", "4",
                       "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1"])
    data = build_data(args)
    assert isinstance(data.train, MockGPTDataset) and isinstance(data.valid, MockGPTDataset)
    # Without --tokenizer-type: NullTokenizer over --vocab-size (ids 0..63, EOD 64).
    assert (data.vocab_size, data.eod_token_id) == (65, 64)
    follows, checked = 0, 200  # a full epoch of mock data is millions of samples
    for i in range(checked):
        sample = data.train[i]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert tokens[1:] == labels[:-1] and len(tokens) == 64
        for a, b in zip(tokens, tokens[1:]):
            # Within a document the next id is (a + 1) mod 65; a document ends in EOD (64), and
            # the next document starts at 1 (or is EOD alone).
            assert b in ((a + 1) % 65, 64) or (a == 64 and b == 1), (i, a, b)
            follows += b == (a + 1) % 65
    assert follows > 0.9 * checked * 63


def test_mock_data_without_a_vocabulary_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--mock-data"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--mock-data needs --vocab-size" in err
