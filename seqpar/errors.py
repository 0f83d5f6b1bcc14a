"""One error type for every input seqpar rejects. Messages always name the fix."""


class SeqparError(ValueError):
    """Invalid input or configuration. Raised before any communication, on every rank."""
