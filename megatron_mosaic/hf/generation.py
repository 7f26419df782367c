"""Load a Megatron checkpoint or an exported HF directory and generate continuations."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .conversion import ConversionError
from .export import (
    ARGS_FILE,
    build_hf_tokenizer,
    hf_model_from_checkpoint,
    null_tokenizer_vocab_size,
    padded_token_ids,
)
from .megatron_checkpoint import _read_common, find_iteration_dir


@dataclass
class Continuation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str | None  # decoded continuation, None without a tokenizer
    seconds: float


def training_args(path: str) -> dict:
    """The Megatron run arguments behind ``path``: an exported directory's megatron_args.json
    ({} when it has none), or a checkpoint's stored arguments (read without its tensors)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        args_file = os.path.join(path, ARGS_FILE)
        if not os.path.isfile(args_file):
            return {}
        try:
            with open(args_file, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as err:
            raise ConversionError(f"{args_file}: cannot be read ({err})") from err
        args = stored.get("args") if isinstance(stored, dict) else None
        return args if isinstance(args, dict) else {}
    return dict(_read_common(find_iteration_dir(path))["args"])


def ids_only(args: dict) -> bool:
    """Whether the model was trained on token ids alone (NullTokenizer): text means nothing to it."""
    return null_tokenizer_vocab_size(args) is not None


def load_for_generation(path: str, *, dtype: torch.dtype | None = None, tokenizer_model: str | None = None):
    """(model, tokenizer or None) from an HF directory (config.json) or a Megatron checkpoint.

    An HF directory is loaded through the Auto classes (remote code for Memory Mosaics); a
    checkpoint is converted in memory, exactly as ``convert_to_hf.py`` would write it.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)
        tokenizer = None
        if tokenizer_model is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_model, trust_remote_code=True)
        elif os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        null_vocab = null_tokenizer_vocab_size(training_args(path))
        if null_vocab is not None and not model.generation_config.suppress_tokens:
            # Exported (with --no-tokenizer) before export wrote NullTokenizer's suppress_tokens.
            model.generation_config.suppress_tokens = padded_token_ids(null_vocab, model.config.vocab_size)
        return model.eval(), tokenizer
    model, checkpoint = hf_model_from_checkpoint(path, dtype)
    return model.eval(), build_hf_tokenizer(checkpoint.args, tokenizer_model)


def generate_continuations(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 1234,
    use_cache: bool = True,
) -> list[Continuation]:
    """Continue each prompt (text needs a tokenizer; a list of ints is taken as token ids).

    temperature 0 is greedy decoding; otherwise sampling with that temperature (and top-k if > 0).
    Generation stops at max_new_tokens or at the EOD token (the generation config's eos). Ids
    that exist only through vocabulary padding are never emitted: those past the tokenizer, or
    without one the generation config's ``suppress_tokens`` (a NullTokenizer model's: past N + 1,
    set by export and by load_for_generation from the checkpoint's arguments).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    results = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConversionError(f"prompt {prompt[:40]!r} is text, but the model has no tokenizer (a "
                                      "NullTokenizer model's text is its token ids): give token ids with "
                                      "--prompt-ids, or a tokenizer with --tokenizer-model")
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        if max(ids) >= model.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt ids {ids} fall outside the vocabulary [0, {model.config.vocab_size})")
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None) if temperature > 0 else dict(
            do_sample=False, temperature=None, top_k=None, top_p=None)
        if tokenizer is not None:  # padded-vocabulary ids have no text (HF dirs exported before this rule)
            sampling["suppress_tokens"] = padded_token_ids(len(tokenizer), model.config.vocab_size)
        else:  # NullTokenizer: the real vocabulary comes from the checkpoint, not a tokenizer
            sampling["suppress_tokens"] = model.generation_config.suppress_tokens
        torch.manual_seed(seed)
        input_ids = torch.tensor([ids], device=model.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, use_cache=use_cache,
                                 attention_mask=torch.ones_like(input_ids), **sampling)
        seconds = time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        results.append(Continuation(prompt_ids=ids, new_ids=new, text=text, seconds=seconds))
    return results
