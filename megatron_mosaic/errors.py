"""User errors: what a command answers with one line and exit status 1, never a traceback.

A user error is a problem with what the user gave: a path, a data set, a tokenizer, a
checkpoint, an argument, a disk that is full. Every other exception is a bug in this code (or
in a library) and keeps its traceback. The classes below are the user-facing ones; each
module defines its own (they stay importable without torch), and this module recognises them
by name, so it imports nothing heavy itself.
"""

from __future__ import annotations

import errno
import sys
from typing import Optional

# Exceptions whose message already says what is wrong and with which file or argument.
USER_ERROR_CLASSES = frozenset({
    "megatron_mosaic.errors.UserError",
    "megatron_mosaic.data.corpus.DataError",
    "megatron_mosaic.data.tokenizers.TokenizerError",
    "megatron_mosaic.training.argument_checks.ArgumentError",
    "megatron_mosaic.hf.megatron_checkpoint.CheckpointError",
    "megatron_mosaic.hf.conversion.ConversionError",
    "megatron_mosaic.model.official_v1.OfficialCheckpointError",
    "megatron_mosaic.evaluation.vocab.VocabError",
    "megatron_mosaic.evaluation.documents.DocumentFormatError",
    "megatron_mosaic.training.loop.TrainingDivergedError",
    "megatron_mosaic.training.checkpoint_state.CheckpointMismatchError",
})

# OS errors about a path the user named or the disk it is on (not about the program).
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                   FileExistsError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


class UserError(Exception):
    """A problem with the user's input; the message names the argument or file."""


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, _USER_OS_ERRORS):
        return True
    if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERROR_CLASSES
               for cls in type(err).__mro__)


def describe(err: BaseException) -> str:
    """The one-line message for a user error (OS errors as 'reason: path')."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
        if err.filename2 is not None:
            text += f" -> {err.filename2}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, whatever the message held


def print_error(message: str, prog: Optional[str] = None) -> None:
    """``ERROR: message`` (or ``prog: error: message``, argparse's form) on stderr."""
    line = f"{prog}: error: {message}" if prog else f"ERROR: {message}"
    print(line, file=sys.stderr, flush=True)
