"""Local (single-block) kernels and the pure-torch oracle."""

from .attention import (attention, attention_backend, attention_backward, attention_delta,
                        attention_forward)
from . import registry
from .reference import attention_reference
from .registry import set_attention_kernel
from .rope import apply_rope, apply_rope_from_positions, rope_cos_sin, rope_parameters

__all__ = ["attention", "attention_backend", "attention_forward", "attention_backward",
           "attention_delta", "attention_reference", "apply_rope", "apply_rope_from_positions",
           "rope_cos_sin", "rope_parameters", "registry", "set_attention_kernel"]
