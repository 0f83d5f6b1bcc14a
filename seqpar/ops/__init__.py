"""Local (single-block) kernels and the pure-torch oracle."""

from .attention import (attention, attention_backend, attention_backward, attention_delta,
                        attention_forward)
from .reference import attention_reference

__all__ = ["attention", "attention_backend", "attention_forward", "attention_backward",
           "attention_delta", "attention_reference"]
