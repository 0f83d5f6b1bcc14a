"""`extend_context`: set a model config's RoPE scaling for a longer target length.

The rope parameters are written in transformers' own format (`config.rope_parameters`)
and checked with transformers' own validation and `ROPE_INIT_FUNCTIONS`, so the model,
the fused RoPE op (which reads inv_freq and attention scaling from the same functions)
and a later `from_pretrained` all agree. No rope formula is re-implemented here.
"""

from __future__ import annotations

import copy

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..errors import SeqparError

METHODS = ("linear", "dynamic", "yarn", "llama3", "longrope", "abf")


def _base_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise SeqparError(f"{type(config).__name__} has no rope_theta: is this a RoPE model?")
        params["rope_theta"] = theta
    return params


def extend_context(config, target_len: int, method: str = "yarn", *, original_max_position_embeddings=None,
                   factor: float | None = None, rope_theta: float | None = None, **kw):
    """Return a copy of `config` whose RoPE covers `target_len` tokens with `method`.

    linear (position interpolation), dynamic (NTK), yarn, llama3 and longrope are
    transformers rope types: `factor` defaults to target_len / original length, and extra
    keywords (beta_fast, low_freq_factor, short_factor/long_factor, ...) are passed
    through. `abf` raises the base frequency to `rope_theta` (required) instead.
    """
    if method not in METHODS:
        raise SeqparError(f"unknown RoPE extension method {method!r}; choose one of {', '.join(METHODS)}.")
    config = copy.deepcopy(config)
    params = _base_parameters(config)
    original = original_max_position_embeddings or params.get("original_max_position_embeddings") \
        or config.max_position_embeddings
    if target_len <= 0:
        raise SeqparError(f"target_len must be positive, got {target_len}.")
    if method == "abf":
        if not rope_theta:
            raise SeqparError("method 'abf' needs rope_theta (the new, larger base frequency).")
        params = {"rope_type": "default", "rope_theta": float(rope_theta)}
    else:
        params = {"rope_type": method, "rope_theta": params["rope_theta"],
                  "factor": float(factor or max(1.0, target_len / original)),
                  "original_max_position_embeddings": int(original), **kw}
        if method in ("linear", "dynamic"):  # these read the original length from max_position_embeddings
            params.pop("original_max_position_embeddings")
        if method == "llama3":
            params.setdefault("low_freq_factor", 1.0)
            params.setdefault("high_freq_factor", 4.0)
        if method == "longrope":
            params.pop("factor")
            head_half = _head_dim(config) // 2
            for key in ("short_factor", "long_factor"):
                if len(params.get(key) or []) != head_half:
                    raise SeqparError(f"method 'longrope' needs {key}: a list of {head_half} floats "
                                      f"(head_dim / 2), e.g. from the LongRoPE search.")
    config.rope_parameters = params
    # Dynamic NTK rescales when a sequence exceeds max_position_embeddings, so that must
    # stay the original length; every other method is told the new length.
    config.max_position_embeddings = int(original if method == "dynamic" else target_len)
    try:
        config.validate_rope()
        if params["rope_type"] != "default":
            ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    except (KeyError, ValueError, TypeError) as err:
        raise SeqparError(f"transformers rejected the {method} rope parameters {params}: {err}") from None
    return config


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
