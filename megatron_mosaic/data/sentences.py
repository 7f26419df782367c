"""Sentence splitting with NLTK Punkt trained offline on the input itself.

Megatron-LM loads NLTK's pre-trained ``punkt`` data, which cannot be downloaded here. Punkt is
unsupervised, so it is trained on the corpus being split: the first ``max_chars`` characters of
document text, in input order. Training is deterministic (counting and fixed thresholds), and the
learnt parameters are pickled to every worker process, so all workers split identically.

``keep_newlines`` follows Megatron-LM's ``--keep-newlines``: the whitespace (newlines included)
after a sentence stays attached to it, so the sentences concatenate back to the document exactly.
Without it, the whitespace between sentences is dropped, as Punkt does by default.
"""

from __future__ import annotations

from typing import Iterable

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer


def train_punkt(texts: Iterable[str], max_chars: int) -> tuple[PunktParameters, int]:
    """Punkt parameters learnt from the first ``max_chars`` characters of ``texts``.

    Returns (parameters, number of characters trained on).
    """
    trainer = PunktTrainer()
    used = 0
    for text in texts:
        if used >= max_chars:
            break
        piece = text[: max_chars - used]
        trainer.train(piece, finalize=False)
        used += len(piece)
    trainer.finalize_training()
    return trainer.get_params(), used


class SentenceSplitter:
    """Split a document into sentences with fixed Punkt parameters."""

    def __init__(self, params: PunktParameters, keep_newlines: bool = False) -> None:
        self._punkt = PunktSentenceTokenizer(params)
        self.keep_newlines = keep_newlines

    def split(self, text: str) -> list[str]:
        spans = list(self._punkt.span_tokenize(text))
        if not spans:
            return []
        if not self.keep_newlines:
            return [text[start:end] for start, end in spans]
        # Each sentence runs to the start of the next one; the first also takes any leading
        # whitespace, the last any trailing whitespace: "".join(result) == text.
        starts = [0] + [start for start, _ in spans[1:]]
        ends = starts[1:] + [len(text)]
        return [text[s:e] for s, e in zip(starts, ends)]
