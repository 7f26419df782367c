"""Megatron checkpoint -> Hugging Face model directory (issue 6, part 1).

The output is written to a temporary sibling directory and renamed into place only when every
file is complete, so a failed conversion never leaves something that looks like a model.

Memory Mosaics export as ``MemoryMosaicForCausalLM`` with remote code: the configuration,
modeling, layer, memory and cache files of this package plus the torch-only memory math
(megatron_mosaic/memory/*.py, copied flat next to the modeling file, which imports them
relatively). ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then needs
only torch and transformers. The GPT baseline exports as a standard ``LlamaForCausalLM``.

This module builds the HF model and tokenizer and writes the export; export_files.py holds the
staged directory and the copying (and portability check) of that model code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from .conversion import (
    ConversionError,
    check_tensors,
    gpt_to_llama,
    hf_config_from_args,
    model_kind,
    mosaic_to_hf,
)
from .export_files import (  # noqa: F401  (re-exported: importers and tests name them here)
    HF_PACKAGE_DIR,
    MEMORY_PACKAGE_DIR,
    MODEL_CODE_FILES,
    MODELING_FILE,
    copy_model_code,
    memory_code_files,
    staged_directory,
)
from .megatron_checkpoint import read_megatron_checkpoint

TOKENIZER_CODE_FILE = "tokenization_memory_mosaic.py"
ARGS_FILE = "megatron_args.json"
AUTO_MAP = {
    "AutoConfig": "configuration_memory_mosaic.MemoryMosaicConfig",
    "AutoModel": "modeling_memory_mosaic.MemoryMosaicModel",
    "AutoModelForCausalLM": "modeling_memory_mosaic.MemoryMosaicForCausalLM",
}


def _cast(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return dict(tensors)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (the checkpoint replaces
    them: no weight is initialised, each allocation is dropped at once) but their buffers for
    real: a non-persistent buffer such as Llama's rotary ``inv_freq`` is computed at construction
    and stored in no checkpoint, so building it under ``torch.device("meta")`` leaves it without
    data. (accelerate's init_empty_weights(include_buffers=False), without the dependency.)"""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_hf_model(config, state: Mapping[str, Tensor], model_cls, source: str):
    """Instantiate ``model_cls(config)`` with parameters unallocated, check ``state`` against it
    in full, and assign the tensors (tied parameters are re-tied, not stored twice)."""
    with parameters_on_meta():
        model = model_cls(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected = {name: p.shape for name, p in model.state_dict().items() if name not in tied}
    check_tensors(expected, state, source, f"{model_cls.__name__} built from the checkpoint's arguments")
    model.load_state_dict(dict(state), strict=False, assign=True)
    model.tie_weights()
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConversionError(f"tensors left without data after loading: {leftover}")
    return model.eval()


def generation_config_for(eod: int | None):
    """Stop at the end of the document. No pad id: EOD also occurs inside packed prompts, and a
    pad id equal to a prompt token would make generate() mask that token out. No length: a
    stored max_new_tokens overrides the max_length callers such as lm_eval pass."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=eod, bos_token_id=None, do_sample=False)


def null_tokenizer_vocab_size(args: Mapping[str, Any]) -> int | None:
    """The real vocabulary of a checkpoint trained on token ids alone, else None.

    NullTokenizer (``--tokenizer-type NullTokenizer --vocab-size N``, or ``--mock-data
    --vocab-size N`` without a --tokenizer-type, which pairs them): ids 0..N-1 and EOD = N, so
    N + 1 ids; those past it exist only through padding. There is no tokenizer to export: the
    ids are the text.
    """
    n = args.get("vocab_size")
    if n is None:
        return None
    kind = args.get("tokenizer_type")
    if kind == "NullTokenizer" or (kind is None and args.get("mock_data") and args.get("eod_token_id") == n):
        return int(n) + 1
    return None


def padded_token_ids(tokenizer_size: int, vocab_size: int) -> list[int] | None:
    """Ids past the tokenizer that exist only because the vocabulary was padded (for TP and
    alignment): a tokenizer cannot decode them, so generation must never emit them."""
    return list(range(tokenizer_size, vocab_size)) if tokenizer_size < vocab_size else None


def build_hf_tokenizer(args: Mapping[str, Any], tokenizer_model: str | None = None):
    """The training tokenizer of a checkpoint as a transformers tokenizer, or None if it has none.

    ``tokenizer_model`` overrides the path stored in the checkpoint (e.g. after moving files).
    SentencePiece -> MemoryMosaicTokenizer (exact ids, shipped as remote code); GPT-2 BPE ->
    PreTrainedTokenizerFast over the same ``tokenizers`` pipeline; HF directory -> itself (its
    eos_token set to the checkpoint's ``--eod-token`` when it was trained with one); NullTokenizer
    -> None (the ids are the text).
    """
    kind = args.get("tokenizer_type")
    if not kind:
        return None
    if kind == "NullTokenizer":
        if tokenizer_model:
            raise ConversionError("the checkpoint was trained with NullTokenizer (the token ids are the text): "
                                  "it has no tokenizer for --tokenizer-model to replace")
        return None
    model_path = tokenizer_model or args.get("tokenizer_model")
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not model_path or not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} named by the checkpoint does not exist "
                "(pass --tokenizer-model PATH, or --no-tokenizer to go without one)"
            )
        from .tokenization_memory_mosaic import MemoryMosaicTokenizer

        return MemoryMosaicTokenizer(model_path)
    if kind == "GPT2BPETokenizer":
        from transformers import PreTrainedTokenizerFast

        from megatron_mosaic.data.tokenizers import GPT2BPETokenizer, TokenizerSpec

        spec = TokenizerSpec(kind, None, args.get("vocab_file"), args.get("merge_file"))
        backend = GPT2BPETokenizer(spec)._backend
        # A literal <|endoftext|> in text is ordinary bytes to training's tokenizer: only the data
        # pipeline inserts EOD ids (split_special_tokens keeps the two in agreement).
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=GPT2BPETokenizer.EOD_TOKEN,
                                       clean_up_tokenization_spaces=False, split_special_tokens=True)
    if kind == "HuggingFaceTokenizer":
        from transformers import AutoTokenizer

        if not model_path or not os.path.isdir(model_path):
            raise FileNotFoundError(f"tokenizer directory {model_path!r} named by the checkpoint does not exist "
                                    "(pass --tokenizer-model DIR, or --no-tokenizer)")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        eod_token = args.get("eod_token")
        if eod_token is not None:
            # Training's EOD was this entry (--eod-token), whatever the directory declares as EOS
            # (a tokenizer.json alone declares none): the exported eos must be the same id as
            # generation_config.eos_token_id.
            if eod_token not in tokenizer.get_vocab():
                raise ConversionError(f"--eod-token {eod_token!r} of the checkpoint is not in the vocabulary of "
                                      f"tokenizer directory {model_path}")
            tokenizer.eos_token = eod_token
        return tokenizer
    raise ConversionError(f"checkpoint args.tokenizer_type {kind!r} has no Hugging Face equivalent")


def save_hf_tokenizer(tokenizer, target_dir: str) -> None:
    """save_pretrained, plus the remote-code file and auto_map for the SentencePiece wrapper."""
    tokenizer.save_pretrained(target_dir)
    if type(tokenizer).__name__ != "MemoryMosaicTokenizer":
        return
    shutil.copyfile(os.path.join(HF_PACKAGE_DIR, TOKENIZER_CODE_FILE), os.path.join(target_dir, TOKENIZER_CODE_FILE))
    config_path = os.path.join(target_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_memory_mosaic.MemoryMosaicTokenizer", None]}
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def hf_model_from_checkpoint(load_dir: str, dtype: torch.dtype | None = None):
    """(HF model in memory, MegatronCheckpoint) for the latest checkpoint of ``load_dir``."""
    checkpoint = read_megatron_checkpoint(load_dir)
    args = checkpoint.args
    kind = model_kind(args)
    config = hf_config_from_args(args)
    if not kind.is_mosaic:
        from transformers import LlamaForCausalLM

        state = gpt_to_llama(checkpoint.tensors, config.num_attention_heads, config.num_key_value_heads)
        model_cls = LlamaForCausalLM
    else:
        from .modeling_memory_mosaic import MemoryMosaicForCausalLM

        state = mosaic_to_hf(checkpoint.tensors, kind.mosaic_version)
        model_cls = MemoryMosaicForCausalLM
        config.auto_map = dict(AUTO_MAP)
    model = build_hf_model(config, _cast(state, dtype), model_cls, f"checkpoint {checkpoint.path}")
    model.generation_config = generation_config_for(args.get("eod_token_id"))
    null_vocab = null_tokenizer_vocab_size(args)
    if null_vocab is not None:  # no tokenizer to size the vocabulary: the checkpoint's N + 1
        model.generation_config.suppress_tokens = padded_token_ids(null_vocab, model.config.vocab_size)
    return model, checkpoint


def export_to_hf(
    load_dir: str,
    output_dir: str,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    tokenizer_model: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert the latest checkpoint in ``load_dir`` into an HF directory at ``output_dir``.

    Returns a summary: model kind, iteration, parameter count, tokenizer kind, files written.
    """
    model, checkpoint = hf_model_from_checkpoint(load_dir, dtype)
    args = checkpoint.args
    kind = model_kind(args)
    hf_tokenizer = build_hf_tokenizer(args, tokenizer_model) if tokenizer else None
    if hf_tokenizer is not None:
        model.generation_config.suppress_tokens = padded_token_ids(len(hf_tokenizer), model.config.vocab_size)
    with staged_directory(output_dir, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if kind.is_mosaic:
            copy_model_code(staging)
        if hf_tokenizer is not None:
            save_hf_tokenizer(hf_tokenizer, staging)
        with open(os.path.join(staging, ARGS_FILE), "w", encoding="utf-8") as f:
            json.dump({"iteration": checkpoint.iteration, "consumed_samples": checkpoint.consumed_samples,
                       "args": {k: _json_safe(v) for k, v in args.items()}}, f, indent=2, sort_keys=True)
        files = sorted(os.listdir(staging))
    return {
        "model": kind.name,
        "iteration": checkpoint.iteration,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": args.get("tokenizer_type") if hf_tokenizer is not None else None,
        "files": files,
        "output": os.path.abspath(output_dir),
    }
