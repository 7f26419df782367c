"""What the command-line tools share: how a user error is reported."""

from __future__ import annotations

import sys
from typing import Callable

from megatron_mosaic.errors import describe, is_user_error


def cli_error(prog: str, message: object, status: int = 1) -> int:
    """Print ``prog: error: message`` to stderr (argparse's format, no traceback) and return
    ``status``, the exit code for ``main`` to return."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {text}", file=sys.stderr)
    return status


def run_tool(main: Callable[[], int], prog: str) -> int:
    """Run a tool's ``main``; a user error it did not handle itself (a path, a full disk, bad
    data: see megatron_mosaic.errors) becomes one ``prog: error:`` line and exit status 1.
    Anything else is a bug and keeps its traceback."""
    try:
        return main()
    except Exception as err:
        if not is_user_error(err):
            raise
        return cli_error(prog, describe(err))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is an argparse error, exit status 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
