"""Bad input to the converters: clear errors, and never a partial output left behind."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import pytest
import torch

from megatron_mosaic.hf import export as export_module
from megatron_mosaic.hf.conversion import ConversionError
from megatron_mosaic.hf.export import export_to_hf, staged_directory
from megatron_mosaic.hf.importer import import_from_hf
from megatron_mosaic.hf.megatron_checkpoint import CheckpointError

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint")


def no_output(path: str) -> bool:
    parent = os.path.dirname(path)
    return not os.path.exists(path) and not glob.glob(os.path.join(parent, f".{os.path.basename(path)}.partial-*"))


def copy_checkpoint(parallel_checkpoints, name: str, tmp_path) -> str:
    target = str(tmp_path / name)
    shutil.copytree(parallel_checkpoints.path(name), target)
    return target


def edit_args(checkpoint: str, **changes) -> None:
    common_file = os.path.join(checkpoint, "iter_0000007", "common.pt")
    common = torch.load(common_file, weights_only=False)
    common["args"].update(changes)
    torch.save(common, common_file)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Megatron checkpoint directory"):
        export_to_hf(str(tmp_path / "empty"), out)
    with pytest.raises(CheckpointError, match="no such directory"):
        export_to_hf(str(tmp_path / "missing"), out)
    (tmp_path / "tracked").mkdir()
    (tmp_path / "tracked" / "latest_checkpointed_iteration.txt").write_text("12")
    with pytest.raises(CheckpointError, match="names iteration 12"):
        export_to_hf(str(tmp_path / "tracked"), out)
    assert no_output(out)


def test_missing_and_truncated_shards(parallel_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    broken = copy_checkpoint(parallel_checkpoints, "v2_tp2", tmp_path)
    shard = sorted(glob.glob(os.path.join(broken, "iter_0000007", "*.distcp")))[-1]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{os.path.basename(shard)}: truncated"):
        export_to_hf(broken, out)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=f"{os.path.basename(shard)}: shard file missing"):
        export_to_hf(broken, out)
    assert no_output(out)


def test_checkpoint_arguments_that_do_not_match_the_weights(parallel_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    wide = copy_checkpoint(parallel_checkpoints, "v1_pp2", tmp_path)
    edit_args(wide, hidden_size=64, num_attention_heads=8)
    with pytest.raises(ConversionError, match="shape mismatch"):
        export_to_hf(wide, out)
    deep = str(tmp_path / "deep")
    shutil.copytree(parallel_checkpoints.path("v2_pp2"), deep)
    edit_args(deep, num_layers=3)
    with pytest.raises(CheckpointError, match="num_layers=3"):
        export_to_hf(deep, out)
    other = str(tmp_path / "other")
    shutil.copytree(parallel_checkpoints.path("v2_pp2"), other)
    edit_args(other, model="mosaic-v1")
    with pytest.raises(ConversionError, match="differs from the tied embedding|missing from checkpoint"):
        export_to_hf(other, out)
    edit_args(other, model="mamba")
    with pytest.raises(ConversionError, match="args.model is 'mamba'"):
        export_to_hf(other, out)
    assert no_output(out)


def test_missing_tokenizer_and_existing_output(parallel_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    moved = copy_checkpoint(parallel_checkpoints, "v2_tp2", tmp_path)
    edit_args(moved, tokenizer_model=str(tmp_path / "gone.model"))
    with pytest.raises(FileNotFoundError, match="gone.model"):
        export_to_hf(moved, out)
    assert no_output(out)
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_hf(parallel_checkpoints.path("v1_pp2"), out)
    assert os.listdir(out) == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(parallel_checkpoints, tmp_path, monkeypatch):
    out = str(tmp_path / "out")

    def broken_copy(target_dir):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "copy_model_code", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        export_to_hf(parallel_checkpoints.path("v1_pp2"), out)
    assert no_output(out)
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            open(os.path.join(staging, "config.json"), "w").write("{}")
            raise RuntimeError("interrupted")
    assert no_output(out)


def _hf_copy(exported, name: str, tmp_path) -> str:
    target = str(tmp_path / f"hf_{name}")
    shutil.copytree(exported[name], target)
    return target


def _edit_config(hf_dir: str, **changes) -> None:
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_hf_directories_that_cannot_be_imported(exported, tmp_path):
    out = str(tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="no config.json"):
        import_from_hf(str(tmp_path), out)
    unknown = _hf_copy(exported, "v2_pp2", tmp_path)
    _edit_config(unknown, model_type="bert")
    with pytest.raises(ConversionError, match="model_type 'bert' is not supported"):
        import_from_hf(unknown, out)
    mismatched = _hf_copy(exported, "v1_tp2", tmp_path)
    _edit_config(mismatched, persistent_memory_size=40)
    with pytest.raises(ConversionError, match="shape mismatch.*memory_keys"):
        import_from_hf(mismatched, out)
    _edit_config(mismatched, persistent_memory_size=24, num_hidden_layers=3)
    with pytest.raises(ConversionError, match="missing from .*decoder.layers.2"):
        import_from_hf(mismatched, out)
    gpt = _hf_copy(exported, "gpt_tp2", tmp_path)
    _edit_config(gpt, num_key_value_heads=2)
    with pytest.raises(ConversionError, match="grouped-query attention"):
        import_from_hf(gpt, out)
    shards = _hf_copy(exported, "v2_tp2", tmp_path)
    index = json.load(open(os.path.join(shards, "model.safetensors.index.json")))
    os.remove(os.path.join(shards, sorted(set(index["weight_map"].values()))[-1]))
    with pytest.raises(ConversionError, match="shard missing"):
        import_from_hf(shards, out)
    assert no_output(out)


def test_command_line_tools_report_errors_without_tracebacks(exported, tmp_path, capsys):
    sys.path.insert(0, TOOLS)
    try:
        import convert_from_hf
        import convert_to_hf
    finally:
        sys.path.pop(0)
    assert convert_to_hf.main(["--load", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "convert_to_hf: error: --load" in capsys.readouterr().err
    unknown = _hf_copy(exported, "v2_pp2", tmp_path)
    _edit_config(unknown, model_type="gpt2")
    assert convert_from_hf.main(["--load", unknown, "--save", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_from_hf: error:") and "model_type 'gpt2'" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "c")
