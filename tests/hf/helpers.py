"""Small shared helpers of the HF tests."""

from __future__ import annotations

import os

from tests.hf.parallel_checkpoints import EOD

# The toy tokenizers' training text: a fixed file of the tests' own, so that editing the
# project's sources never changes a test tokenizer (prose, numbers and code-like lines).
SPM_TEXT = os.path.join(os.path.dirname(__file__), "tokenizer_corpus.txt")


def train_tiny_sentencepiece(prefix: str) -> str:
    """A 120-piece BPE model whose EOS (the EOD token) has id EOD."""
    import sentencepiece as spm

    lines = [line for line in open(SPM_TEXT, encoding="utf-8").read().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=120, model_type="bpe",
        unk_id=0, bos_id=1, pad_id=2, eos_id=EOD, minloglevel=2,
    )
    return prefix + ".model"
