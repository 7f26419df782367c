"""Hugging Face model directory -> Megatron checkpoint that ``pretrain_mosaic.py --load`` continues.

The checkpoint is written by the training code itself (``save_checkpoint`` on a model built by
``build_model``) in a one-rank process group at TP=PP=1; distributed checkpointing stores global
tensors, so the result loads under any TP/PP layout. It holds the model only: the optimizer
starts fresh (``load_checkpoint`` warns). The whole checkpoint directory is staged and renamed
into place on success.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from .conversion import (
    ConversionError,
    args_from_hf_config,
    check_tensors,
    hf_to_mosaic,
    llama_to_gpt,
)
from .export import ARGS_FILE
from .export_files import staged_directory

SUPPORTED_MODEL_TYPES = ("memory_mosaic", "llama")


def read_hf_config(hf_dir: str):
    """The directory's config as a MemoryMosaicConfig or LlamaConfig (clear errors otherwise)."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--load {hf_dir}: no such directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"--load {hf_dir}: not a Hugging Face model directory (no config.json)")
    try:
        raw = json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported (one of {SUPPORTED_MODEL_TYPES})")
    if model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig.from_pretrained(hf_dir)
    from .configuration_memory_mosaic import MemoryMosaicConfig

    return MemoryMosaicConfig.from_pretrained(hf_dir)


def read_hf_weights(hf_dir: str) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists (each checked)."""
    from safetensors import safe_open

    single = os.path.join(hf_dir, "model.safetensors")
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = json.load(open(index_path, encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ConversionError(f"--load {hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, Tensor] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: shard missing (listed in {index_path})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ConversionError(f"{path}: tensor {key} also stored in another shard")
                    tensors[key] = f.get_tensor(key)
        except ConversionError:
            raise
        except Exception as err:
            raise ConversionError(f"{path}: cannot be read as safetensors ({err})") from err
    if weight_map is not None:
        absent = sorted(k for k, f in weight_map.items() if k not in tensors)
        if absent:
            raise ConversionError(f"{index_path} lists tensors not found in the shards: {absent[:8]}")
    return tensors


def _saved_run(hf_dir: str) -> tuple[dict[str, Any], int, int]:
    """(arguments, iteration, consumed samples) of the exported run, or ({}, 0, 0)."""
    path = os.path.join(hf_dir, ARGS_FILE)
    if not os.path.isfile(path):
        return {}, 0, 0
    try:
        saved = json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err
    return dict(saved.get("args") or {}), int(saved.get("iteration") or 0), int(saved.get("consumed_samples") or 0)


def import_from_hf(hf_dir: str, save_dir: str, *, iteration: int | None = None, overwrite: bool = False) -> dict:
    """Convert ``hf_dir`` into a Megatron checkpoint directory ``save_dir``; returns a summary.

    The run arguments come from the exported run (``megatron_args.json``) when present, with
    every architecture field taken from ``config.json``; ``iteration`` (and the consumed-sample
    count, so the data order resumes) default to the exported run's (0 for a foreign model).
    """
    from megatron_mosaic.model.official_v1 import load_mapped_state_dict, loadable_tensors
    from megatron_mosaic.training.arguments import args_to_dict, args_from_dict
    from megatron_mosaic.training.checkpointing import save_checkpoint
    from megatron_mosaic.training.initialize import single_rank_megatron
    from megatron_mosaic.training.model_builder import build_model

    config = read_hf_config(hf_dir)
    base_args, saved_iteration, consumed_samples = _saved_run(hf_dir)
    args = args_to_dict(args_from_dict(args_from_hf_config(config, base_args)))
    weights = read_hf_weights(hf_dir)
    if config.model_type == "llama":
        tensors = llama_to_gpt(weights, config.num_attention_heads, config.num_key_value_heads)
    else:
        tensors = hf_to_mosaic(weights, config.mosaic_version)
    iteration = saved_iteration if iteration is None else iteration
    with single_rank_megatron(int(args.get("seed", 1234))):
        chunks = build_model(args)
        if len(chunks) != 1:
            raise ConversionError("convert_from_hf builds one model chunk (no virtual pipeline)")
        model = chunks[0]
        # Mismatches are reported in Hugging Face terms first; the shared strict loader then
        # copies (cast to the model's dtypes) and proves every parameter holds its tensor.
        expected = {k: v.shape for k, v in loadable_tensors(model).items()}
        check_tensors(expected, tensors, f"{hf_dir} (config.json + weights)",
                      f"the Megatron {args['model']} model its config.json describes")
        load_mapped_state_dict(model, tensors, source=hf_dir, error=ConversionError)
        with staged_directory(save_dir, overwrite) as staging:
            save_checkpoint(staging, iteration, chunks, args=args, consumed_samples=consumed_samples)
    return {"model": args["model"], "iteration": iteration, "output": os.path.abspath(save_dir),
            "parameters": sum(t.numel() for t in tensors.values())}
