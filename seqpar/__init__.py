"""seqpar: exact sequence-parallel attention for long-context continued pretraining."""

from .errors import SeqparError

__version__ = "0.1.0"
__all__ = ["SeqparError", "__version__", "extend_context"]


def extend_context(config, target_len, method="yarn", **kw):
    """See seqpar.model.extend.extend_context (imported lazily: transformers is heavy)."""
    from .model.extend import extend_context as _extend  # deferred: transformers (heavy) on `import seqpar`

    return _extend(config, target_len, method, **kw)
