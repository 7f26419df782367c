"""One tokenizer interface for preprocessing, training, sampling and Hugging Face export.

Three kinds, named as Megatron-LM's ``--tokenizer-type`` names them:

- ``SentencePieceTokenizer`` (alias ``GPTSentencePieceTokenizer``): a ``.model`` file, loaded
  through megatron-core's own SentencePiece wrapper (it works offline). EOD is the model's EOS.
- ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``--vocab-file`` (vocab.json) and
  ``--merge-file`` (merges.txt). megatron-core 0.16.1's wrapper for it cannot be used here: it
  downloads files, resolves the Hub name ``gpt2`` and passes the vocab file as the merges file,
  so the BPE is built from the two files with the ``tokenizers`` library. Like Megatron-LM's own
  GPT-2 BPE, a literal ``<|endoftext|>`` in the text is encoded as ordinary bytes; only
  ``--append-eod`` inserts the EOD id, so text can never fake a document boundary.
- ``HuggingFaceTokenizer``: a local directory readable by ``AutoTokenizer`` (tokenizer.json /
  tokenizer_config.json), through megatron-core's wrapper. EOD is the tokenizer's EOS token.

Every tokenizer exposes what megatron-core's ``GPTDataset`` reads from its config's tokenizer
(``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``), so an instance can be passed to
``GPTDatasetConfig(tokenizer=...)`` directly.
"""

from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("GPT2BPETokenizer", "HuggingFaceTokenizer")

# megatron-core's "no pad token" id (megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID):
# never a real token id, so GPTDataset's pad masking never touches real data.
NO_PAD_ID = -1


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given arguments (message names the argument)."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a tokenizer: picklable, storable in checkpoints.

    Field names match Megatron-LM's argparse destinations, so an ``argparse.Namespace`` from
    :func:`add_tokenizer_args` works wherever a spec does.
    """

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None

    @staticmethod
    def from_args(args) -> "TokenizerSpec":
        return TokenizerSpec(
            tokenizer_type=getattr(args, "tokenizer_type", None),
            tokenizer_model=getattr(args, "tokenizer_model", None),
            vocab_file=getattr(args, "vocab_file", None),
            merge_file=getattr(args, "merge_file", None),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Tokenizer(ABC):
    """Text <-> token ids, plus the ids the rest of the stack needs.

    ``tokenize`` never adds BOS/EOS: document ends are marked only by the preprocessing tool
    (``--append-eod``), and the model finds document boundaries from ``eod`` in the batch.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (for sampling and round-trip checks)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (the model's embedding rows before padding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended by ``--append-eod``; separates packed documents."""

    @property
    def pad(self) -> int:
        """Padding id for megatron-core datasets; ``NO_PAD_ID`` (-1) when there is none."""
        return NO_PAD_ID

    @property
    def files(self) -> dict[str, str]:
        """The files this tokenizer was loaded from, by argument name (for export/copy)."""
        return {k: v for k, v in self.spec.to_dict().items() if k != "tokenizer_type" and v}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identity for megatron-core's dataset cache hash (JSON-serialisable)."""
        ids = OrderedDict(tokenizer_type=self.spec.tokenizer_type)
        ids.update({k: os.path.abspath(v) for k, v in self.files.items()})
        return ids

    def __reduce__(self):
        # Rebuilt from its files: DataLoader workers and spawned processes get a fresh copy
        # without pickling library objects.
        return (build_tokenizer, (self.spec,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, files={self.files})"


def _require_file(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: no such file")
    return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``, through megatron-core's SentencePiece wrapper."""

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__(spec)
        path = _require_file(spec.tokenizer_model, "--tokenizer-model", spec.tokenizer_type)
        from megatron.core.tokenizers import MegatronTokenizer

        try:
            self._tok = MegatronTokenizer.from_pretrained(
                tokenizer_path=path, metadata_path={"library": "sentencepiece"}
            )
        except Exception as err:  # sentencepiece raises a bare RuntimeError/OSError on bad files
            raise TokenizerError(f"--tokenizer-model {path}: not a SentencePiece model ({err})") from err
        sp = self._tok._tokenizer.tokenizer  # the sentencepiece.SentencePieceProcessor
        self._eod = int(sp.eos_id())
        self._pad = int(sp.pad_id())
        self._vocab_size = int(sp.get_piece_size())
        if self._eod < 0:
            raise TokenizerError(
                f"--tokenizer-model {path}: the model has no EOS piece (eos_id=-1), which is the "
                "EOD token; retrain it with an EOS id (tools/train_tokenizer.py always sets one)"
            )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.detokenize([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad if self._pad >= 0 else NO_PAD_ID


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt (built with the ``tokenizers`` library)."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__(spec)
        vocab = _require_file(spec.vocab_file, "--vocab-file", spec.tokenizer_type)
        merges = _require_file(spec.merge_file, "--merge-file", spec.tokenizer_type)
        try:
            from tokenizers import Tokenizer as _Backend
            from tokenizers import decoders, models, pre_tokenizers
        except ImportError as err:
            raise TokenizerError("GPT2BPETokenizer needs the `tokenizers` package (pip install tokenizers)") from err
        try:
            backend = _Backend(models.BPE.from_file(vocab, merges))
        except Exception as err:
            raise TokenizerError(f"--vocab-file {vocab} / --merge-file {merges}: cannot be read as GPT-2 BPE ({err})") from err
        # GPT-2's pre-tokenisation regex and byte<->unicode mapping; no prefix space.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        eod = backend.token_to_id(self.EOD_TOKEN)
        if eod is None:
            raise TokenizerError(f"--vocab-file {vocab}: no {self.EOD_TOKEN!r} entry (GPT-2's EOD token)")
        self._backend = backend
        self._eod = int(eod)
        self._vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory, through megatron-core's AutoTokenizer wrapper."""

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__(spec)
        path = spec.tokenizer_model
        if not path:
            raise TokenizerError(f"--tokenizer-type {spec.tokenizer_type} needs --tokenizer-model DIR")
        if not os.path.isdir(path):
            # Refusing anything but a local directory also keeps AutoTokenizer off the Hub.
            raise TokenizerError(f"--tokenizer-model {path}: no such directory (a local Hugging Face tokenizer directory is required)")
        try:
            from megatron.core.tokenizers.text.libraries import HuggingFaceTokenizer as _Wrapper

            self._tok = _Wrapper(path, use_fast=True)
        except Exception as err:
            raise TokenizerError(f"--tokenizer-model {path}: cannot load a Hugging Face tokenizer ({err})") from err
        if self._tok.eod is None:
            raise TokenizerError(f"--tokenizer-model {path}: the tokenizer has no eos_token, which is the EOD token")
        self._eod = int(self._tok.eod)
        pad = self._tok.pad_id
        self._pad = int(pad) if pad is not None else NO_PAD_ID
        self._vocab_size = int(self._tok.vocab_size)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.text_to_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.ids_to_text([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad


def build_tokenizer(args) -> Tokenizer:
    """Build the tokenizer described by ``args`` (a TokenizerSpec or any args-like object)."""
    spec = args if isinstance(args, TokenizerSpec) else TokenizerSpec.from_args(args)
    if spec.tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(spec)
    if spec.tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(spec)
    if spec.tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(spec)
    raise TokenizerError(f"--tokenizer-type {spec.tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's tokenizer flags (the subset this project implements)."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=TOKENIZER_TYPES,
                       help="SentencePieceTokenizer (--tokenizer-model FILE.model), GPT2BPETokenizer "
                            "(--vocab-file, --merge-file) or HuggingFaceTokenizer (--tokenizer-model "
                            "LOCAL_DIR).")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece .model file, or a local Hugging Face tokenizer directory.")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 BPE vocab.json.")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges.txt.")
    return parser
