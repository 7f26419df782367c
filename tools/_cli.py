"""What the command-line tools share: how a user error is reported."""

from __future__ import annotations

import sys


def cli_error(prog: str, message: object, status: int = 1) -> int:
    """Print ``prog: error: message`` to stderr (argparse's format, no traceback) and return
    ``status``, the exit code for ``main`` to return."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
