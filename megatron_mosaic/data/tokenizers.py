"""One tokenizer interface for preprocessing, training, sampling and Hugging Face export.

Four kinds, named as Megatron-LM's ``--tokenizer-type`` names them:

- ``SentencePieceTokenizer`` (alias ``GPTSentencePieceTokenizer``): a ``.model`` file, loaded
  through megatron-core's own SentencePiece wrapper (it works offline). EOD is the model's EOS.
- ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``--vocab-file`` (vocab.json) and
  ``--merge-file`` (merges.txt). megatron-core 0.16.1's wrapper for it cannot be used here: it
  downloads files, resolves the Hub name ``gpt2`` and passes the vocab file as the merges file,
  so the BPE is built from the two files with the ``tokenizers`` library. Like Megatron-LM's own
  GPT-2 BPE, a literal ``<|endoftext|>`` in the text is encoded as ordinary bytes; only
  ``--append-eod`` inserts the EOD id, so text can never fake a document boundary.
- ``HuggingFaceTokenizer``: a local directory readable by ``AutoTokenizer`` (tokenizer.json /
  tokenizer_config.json), through megatron-core's wrapper. EOD is the tokenizer's EOS token, or
  the vocabulary entry named by ``--eod-token`` (needed when the directory declares no EOS, e.g.
  one holding only tokenizer.json).
- ``NullTokenizer``: pre-tokenized or synthetic data, as in Megatron-LM: the text is
  whitespace-separated integer ids in [0, N) for ``--vocab-size N``; EOD is N, so the vocabulary
  has N + 1 ids. Any other word is an error naming the word (never silently dropped).

Every tokenizer exposes what megatron-core's ``GPTDataset`` reads from its config's tokenizer
(``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``), so an instance can be passed to
``GPTDatasetConfig(tokenizer=...)`` directly.
"""

from __future__ import annotations

import argparse
import os
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")
# TokenizerSpec fields that name files (the rest are settings such as NullTokenizer's vocab size).
FILE_FIELDS = ("tokenizer_model", "vocab_file", "merge_file")
# A NullTokenizer word: anything between whitespace (Megatron-LM splits on spaces; newlines
# separate ids too here, so a .txt file may hold one id or one document per line).
_WORD = re.compile(r"\S+")

# megatron-core's "no pad token" id (megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID):
# never a real token id, so GPTDataset's pad masking never touches real data.
NO_PAD_ID = -1


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given arguments (message names the argument)."""


class InvalidTokenIdError(ValueError):
    """NullTokenizer text holding a word that is not a token id; ``offset`` is the word's
    character offset in the text, so the caller can name the exact input line."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a tokenizer: picklable, storable in checkpoints.

    Field names match Megatron-LM's argparse destinations, so an ``argparse.Namespace`` from
    :func:`add_tokenizer_args` works wherever a spec does. ``vocab_size`` is NullTokenizer's N
    (ids before EOD); ``eod_token`` is HuggingFaceTokenizer's explicit EOD entry.
    """

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    eod_token: Optional[str] = None

    @staticmethod
    def from_args(args) -> "TokenizerSpec":
        tokenizer_type = getattr(args, "tokenizer_type", None)
        return TokenizerSpec(
            tokenizer_type=tokenizer_type,
            tokenizer_model=getattr(args, "tokenizer_model", None),
            vocab_file=getattr(args, "vocab_file", None),
            merge_file=getattr(args, "merge_file", None),
            # pretrain_mosaic.py's --vocab-size also sizes --mock-data: it belongs to the
            # tokenizer only for NullTokenizer, whose vocabulary it defines.
            vocab_size=getattr(args, "vocab_size", None) if tokenizer_type == "NullTokenizer" else None,
            eod_token=getattr(args, "eod_token", None),
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
        # Each backend sets these three once its files are read.
        self._vocab_size = 0
        self._eod = -1
        self._pad = NO_PAD_ID

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (for sampling and round-trip checks)."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the model's embedding rows before padding)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id, appended by ``--append-eod``; separates packed documents."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id for megatron-core datasets; ``NO_PAD_ID`` (-1) when there is none."""
        return self._pad

    @property
    def files(self) -> dict[str, str]:
        """The files this tokenizer was loaded from, by argument name (for export/copy)."""
        return {k: getattr(self.spec, k) for k in FILE_FIELDS if getattr(self.spec, k)}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identity for megatron-core's dataset cache hash (JSON-serialisable)."""
        ids = OrderedDict(tokenizer_type=self.spec.tokenizer_type)
        ids.update({k: os.path.abspath(v) for k, v in self.files.items()})
        for setting in ("vocab_size", "eod_token"):
            if getattr(self.spec, setting) is not None:
                ids[setting] = getattr(self.spec, setting)
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
        self._pad = int(sp.pad_id()) if sp.pad_id() >= 0 else NO_PAD_ID
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
        self._eod = self._eod_id(path, spec.eod_token)
        pad = self._tok.pad_id
        # A pad equal to EOD (pad_token = eos_token is common) would make GPTDataset mask out
        # the document boundaries; megatron-core drops such a pad with a warning, so do it here.
        self._pad = int(pad) if pad is not None and int(pad) != self._eod else NO_PAD_ID
        self._vocab_size = int(self._tok.vocab_size)

    def _eod_id(self, path: str, eod_token: Optional[str]) -> int:
        """The id of ``--eod-token`` when given (it overrides the EOS), else of the EOS token."""
        if eod_token is None:
            if self._tok.eod is None:
                raise TokenizerError(
                    f"--tokenizer-model {path}: the tokenizer has no eos_token, which is the EOD token; "
                    "name its end-of-document token with --eod-token TOKEN")
            return int(self._tok.eod)
        # Looked up, never added: adding a token would change the vocabulary the data was
        # tokenized with. get_vocab() includes added/special tokens.
        vocab = self._tok.tokenizer.get_vocab()
        if eod_token not in vocab:
            raise TokenizerError(f"--eod-token {eod_token!r}: not in the vocabulary of --tokenizer-model {path}")
        return int(vocab[eod_token])

    def tokenize(self, text: str) -> list[int]:
        return self._tok.text_to_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.ids_to_text([int(i) for i in ids])


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer: the text is whitespace-separated ids in [0, N); EOD is N.

    Megatron-LM's converts words with ``int()`` and checks no range; here a word that is not a
    decimal id in range is an error, because an id past N would index past the embedding and
    N itself would fake a document boundary.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__(spec)
        if spec.vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size N "
                                 "(token ids are 0..N-1; N is the EOD id)")
        if int(spec.vocab_size) < 1:
            raise TokenizerError(f"--vocab-size {spec.vocab_size}: NullTokenizer needs at least 1")
        self._n = int(spec.vocab_size)
        self._vocab_size, self._eod = self._n + 1, self._n

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for match in _WORD.finditer(text):
            word = match.group()
            # isdecimal alone accepts non-ASCII digits ("٣"), which int() would also take.
            if not (word.isascii() and word.isdecimal()):
                raise InvalidTokenIdError(f"{word[:40]!r} is not a token id (NullTokenizer text is "
                                          "whitespace-separated decimal integers)", match.start())
            token = int(word)
            if token >= self._n:
                raise InvalidTokenIdError(f"token id {token} is outside [0, {self._n}) "
                                          f"(--vocab-size {self._n}; {self._n} is the EOD id)", match.start())
            ids.append(token)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(args) -> Tokenizer:
    """Build the tokenizer described by ``args`` (a TokenizerSpec or any args-like object)."""
    spec = args if isinstance(args, TokenizerSpec) else TokenizerSpec.from_args(args)
    if spec.eod_token is not None and spec.tokenizer_type != "HuggingFaceTokenizer":
        # Other kinds fix their EOD (SentencePiece's EOS, GPT-2's <|endoftext|>, NullTokenizer's
        # N): ignoring the flag would tokenize differently from what the user asked for.
        raise TokenizerError(f"--eod-token applies to --tokenizer-type HuggingFaceTokenizer only, "
                             f"not {spec.tokenizer_type}")
    if spec.tokenizer_type == "NullTokenizer":
        return NullTokenizer(spec)
    if spec.tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(spec)
    if spec.tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(spec)
    if spec.tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(spec)
    raise TokenizerError(f"--tokenizer-type {spec.tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")


# Shared with pretrain_mosaic.py's arguments, so both tools describe the flags the same way.
TOKENIZER_TYPE_HELP = ("SentencePieceTokenizer (--tokenizer-model FILE.model), GPT2BPETokenizer "
                       "(--vocab-file, --merge-file), HuggingFaceTokenizer (--tokenizer-model LOCAL_DIR, "
                       "optionally --eod-token) or NullTokenizer (--vocab-size N: the text is "
                       "whitespace-separated ids in [0, N), EOD is N).")
VOCAB_SIZE_HELP = ("NullTokenizer: N, the number of ids before EOD (ids 0..N-1 in the text; EOD is N, "
                   "so the vocabulary has N + 1 ids).")
EOD_TOKEN_HELP = ("HuggingFaceTokenizer: the vocabulary entry whose id is the end-of-document (EOD) "
                  "token, instead of the tokenizer's eos_token (required when it declares none, e.g. "
                  "a directory holding only tokenizer.json).")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's tokenizer flags (the subset this project implements)."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=TOKENIZER_TYPES,
                       help=TOKENIZER_TYPE_HELP)
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece .model file, or a local Hugging Face tokenizer directory.")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 BPE vocab.json.")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges.txt.")
    group.add_argument("--vocab-size", type=int, default=None, help=VOCAB_SIZE_HELP)
    group.add_argument("--eod-token", type=str, default=None, metavar="TOKEN", help=EOD_TOKEN_HELP)
    return parser
