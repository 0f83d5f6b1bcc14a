"""seqpar: exact sequence-parallel attention for long-context continued pretraining."""

from .errors import SeqparError

__version__ = "0.1.0"
__all__ = ["SeqparError", "__version__"]
