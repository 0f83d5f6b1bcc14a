"""One error type for every input seqpar rejects. Messages always name the fix."""

import sys


class SeqparError(ValueError):
    """Invalid input or configuration. Raised before any communication, on every rank."""


def print_error(message: str) -> None:
    """Write `seqpar: error: MESSAGE` to stderr in one write call.

    Every rank prints its own copy; `print()` issues the text and the newline as two writes
    when stderr is unbuffered (python -u, PYTHONUNBUFFERED), so two ranks' lines could
    interleave into one. A single write under PIPE_BUF bytes reaches the pipe whole.
    """
    sys.stderr.write(f"seqpar: error: {message}\n")
    sys.stderr.flush()
