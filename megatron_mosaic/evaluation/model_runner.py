"""Score documents by forward passes through a checkpoint's Hugging Face model.

A Megatron checkpoint (any --model, saved at any TP/PP/CP layout: its shards are merged from the
checkpoint metadata) is converted in memory exactly as ``convert_to_hf.py`` would write it; an
exported directory is loaded as it is. Under context parallelism (``cp_runner``) the Megatron
model itself runs instead, and ``LoadedModel.token_scores`` replaces the HF forward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .documents import Document
from .scoring import AnswerResult, PositionLoss, answer_correct
from .vocab import SymbolVocab

ID_TOKENIZERS = (None, "NullTokenizer")  # checkpoints whose token ids are the text's integers


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM in eval mode
    args: dict  # the training arguments stored with the checkpoint ({} if unknown)
    encode: Callable[[str], list[int]]  # segment text -> token ids
    vocab: SymbolVocab  # how the tasks must be rendered for this model
    kind: str
    parameters: int
    train_seq_length: Optional[int] = None
    extra: dict = field(default_factory=dict)
    # input_ids (B, T) -> (log-probability of each next token, argmax prediction), both (B, T-1);
    # None: the HF model's logits on one process.
    token_scores: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None


def _read_export_args(path: str) -> dict:
    args_file = os.path.join(path, "megatron_args.json")
    if not os.path.isfile(args_file):
        return {}
    with open(args_file, encoding="utf-8") as f:
        return json.load(f).get("args", {})


def load_model(path: str, vocab_size: Optional[int] = None, num_symbols: Optional[int] = None) -> LoadedModel:
    """The HF model of ``path`` (HF directory or Megatron checkpoint) and how to feed it text."""
    from megatron_mosaic.hf.export import build_hf_tokenizer, hf_model_from_checkpoint
    from megatron_mosaic.hf.generation import load_for_generation

    if os.path.isfile(os.path.join(path, "config.json")):
        model, tokenizer = load_for_generation(path)
        args = _read_export_args(path)
    else:
        model, checkpoint = hf_model_from_checkpoint(path)
        model.eval()
        args = checkpoint.args
        tokenizer = None
        if args.get("tokenizer_type") not in ID_TOKENIZERS:
            tokenizer = build_hf_tokenizer(args)
    kind = args.get("model") or model.config.model_type
    vocab, encode = feeding(path, args, tokenizer, vocab_size, num_symbols)
    parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, args, encode, vocab, kind, parameters, args.get("seq_length"))


def feeding(path: str, args: dict, tokenizer, vocab_size: Optional[int],
            num_symbols: Optional[int]) -> tuple[SymbolVocab, Callable[[str], list[int]]]:
    """How tasks are rendered for a checkpoint and its text turned into token ids."""
    if args.get("tokenizer_type") in ID_TOKENIZERS and tokenizer is None:
        size = vocab_size or args.get("vocab_size")
        if size is None:
            raise ValueError(f"--load {path}: no tokenizer and no vocabulary size is recorded; pass --vocab-size N "
                             "(the NullTokenizer / mock-data vocabulary the model was trained on)")
        vocab, encode = SymbolVocab("ids", int(size), num_symbols), (lambda text: [int(t) for t in text.split()])
    else:
        if tokenizer is None:
            raise ValueError(f"--load {path}: the checkpoint's tokenizer could not be found")
        vocab = SymbolVocab("text", num_symbols=num_symbols)
        encode = (lambda text: tokenizer.encode(text, add_special_tokens=False))
    return vocab, encode


def hf_token_scores(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=input_ids).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return logprobs, logits[:, :-1].argmax(-1)


@dataclass
class EncodedDocument:
    ids: list[int]
    answers: list[tuple[int, int, dict]]  # (first token, end token, fields)


def encode_document(doc: Document, encode: Callable[[str], list[int]], max_tokens: int) -> EncodedDocument:
    """Token ids segment by segment, so each answer's tokens are exact; segments past
    ``max_tokens`` are dropped whole (text tokenizers make lengths approximate)."""
    ids: list[int] = []
    answers = []
    for segment in doc.segments:
        tokens = encode(segment.text)
        if len(ids) + len(tokens) > max_tokens:
            break
        if segment.answer is not None and ids:
            answers.append((len(ids), len(ids) + len(tokens), segment.answer))
        ids += tokens
    return EncodedDocument(ids, answers)


@torch.no_grad()
def score_batch(loaded: LoadedModel, batch: Sequence[EncodedDocument], task: str,
                positions: PositionLoss) -> list[AnswerResult]:
    """One forward pass over right-padded rows (causal models: padding after a row's end never
    reaches its positions); argmax and log-likelihood of every answer; per-position losses."""
    width = max(len(d.ids) for d in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    for row, doc in enumerate(batch):
        input_ids[row, :len(doc.ids)] = torch.tensor(doc.ids)
    scores = loaded.token_scores or (lambda ids: hf_token_scores(loaded.model, ids))
    logprobs, predicted = scores(input_ids)
    results = []
    for row, doc in enumerate(batch):
        n = len(doc.ids)
        positions.add((-logprobs[row, :n - 1]).tolist())
        for start, end, fields in doc.answers:
            # The token at position p is predicted from position p - 1.
            correct = answer_correct(predicted[row, start - 1:end - 1].tolist(), doc.ids[start:end])
            results.append(AnswerResult(task, n, dict(fields), correct,
                                        float(logprobs[row, start - 1:end - 1].sum()), end - start))
    return results
