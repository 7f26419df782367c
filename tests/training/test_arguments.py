"""Invalid argument combinations fail before any work, naming the arguments (in-process)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron_mosaic.training.arguments import (
    ArgumentError,
    args_from_dict,
    args_to_dict,
    build_parser,
    num_microbatches,
    parse_args,
    validate_args,
)

BASE = ["--mock-data", "--vocab-size", "64", "--num-layers", "4", "--hidden-size", "64",
        "--num-attention-heads", "8", "--micro-batch-size", "2"]


def _error(argv: list[str], world_size: int) -> str:
    with pytest.raises(ArgumentError) as info:
        validate_args(build_parser().parse_args(BASE + argv), world_size)
    return str(info.value)


@pytest.mark.parametrize("argv, world_size, names", [
    (["--num-attention-heads", "6", "--hidden-size", "48", "--tensor-model-parallel-size", "4"], 4,
     ["--num-attention-heads (6)", "--tensor-model-parallel-size (4)"]),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     ["--num-layers (3)", "--pipeline-model-parallel-size (2)"]),
    (["--global-batch-size", "6"], 2,
     ["--global-batch-size (6)", "--micro-batch-size (2)", "data-parallel size (2"]),
    (["--tensor-model-parallel-size", "2"], 3,
     ["world size 3", "--tensor-model-parallel-size (2)"]),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     ["--num-layers-per-virtual-pipeline-stage (3)"]),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1,
     ["--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"]),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "6"], 2, ["micro-batches (3", "--pipeline-model-parallel-size (2)"]),
    (["--hidden-size", "60"], 1, ["--hidden-size (60)", "--num-attention-heads (8)"]),
    (["--context-parallel-size", "2", "--seq-length", "30"], 2,
     ["--seq-length (30)", "--context-parallel-size (2)"]),
    (["--min-lr", "1.0", "--lr", "0.1"], 1, ["--min-lr (1.0)", "--lr (0.1)"]),
    (["--lr-warmup-iters", "10", "--train-iters", "10"], 1, ["--lr-warmup-iters (10)"]),
    (["--long-term-delay-range", "9", "3"], 1, ["--long-term-delay-range"]),
    (["--save-interval", "5"], 1, ["--save-interval needs --save"]),
    (["--fp8-format", "hybrid"], 1, ["--fp8-format hybrid", "Transformer Engine"]),
    (["--transformer-impl", "transformer_engine"], 1, ["--transformer-impl transformer_engine"]),
])
def test_invalid_combination_names_the_arguments(argv, world_size, names):
    message = _error(argv, world_size)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_data_arguments_are_required():
    with pytest.raises(ArgumentError, match="--data-path \(or --train-data-path\) is required"):
        validate_args(build_parser().parse_args(["--num-layers", "2"]), 1)
    with pytest.raises(ArgumentError, match="--tokenizer-type is required"):
        validate_args(build_parser().parse_args(["--data-path", "x"]), 1)


def test_cli_exits_before_any_work(capsys, monkeypatch):
    from megatron_mosaic.training.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 would set it
    with pytest.raises(SystemExit) as info:
        main(BASE + ["--num-layers", "3", "--pipeline-model-parallel-size", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain_mosaic.py: error: --num-layers (3)"), err
    assert not dist.is_initialized()  # failed before the process group was started


def test_derived_fields_and_round_trip():
    args = parse_args(BASE + ["--global-batch-size", "16", "--tensor-model-parallel-size", "2"], 4)
    assert args.data_parallel_size == 2 and num_microbatches(args) == 4
    assert args.ffn_hidden_size == 3 * 64 and args.lr_decay_iters == args.train_iters
    pp = parse_args(BASE + ["--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "4"], 2)
    assert pp.virtual_pipeline_model_parallel_size == 2
    saved = args_to_dict(args)
    restored = args_from_dict(saved)
    assert vars(restored) == {**vars(args), "long_term_delay_range": tuple(args.long_term_delay_range)}
