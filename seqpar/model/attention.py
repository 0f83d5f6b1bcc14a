"""The attention function seqpar registers with transformers' `AttentionInterface`.

Every Hugging Face attention layer calls `attention_interface(module, query, key, value,
attention_mask, scaling=..., **kwargs)` with [b, h, s, d] tensors of this rank's shard.
We hand them to ring / Ulysses / hybrid attention (bshd) with the plan and document ids
that `parallelize`'s forward passes down as keyword arguments. The 4D mask transformers
would build is never made: masks come from global positions (see seqpar.parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..errors import SeqparError
from ..parallel import hybrid_attention, ring_attention, ulysses_attention
from ..parallel.ulysses import kv_replication

ATTN_IMPLEMENTATION = "seqpar"


@dataclass(frozen=True)
class SeqParallelPlan:
    """How a parallelized model runs attention: the mesh, algorithm and layout."""

    mesh: object
    algorithm: str = "ring"
    layout: str = "zigzag"


def seqpar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     seqpar_plan: SeqParallelPlan | None = None, seqpar_doc_ids=None, **kwargs):
    capture = getattr(module, "seqpar_capture", None)
    if capture is not None:  # a tiled layer's projection stage: it attends later, at full length
        return capture(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                       seqpar_plan=seqpar_plan, seqpar_doc_ids=seqpar_doc_ids, **kwargs)
    if seqpar_plan is None:
        raise SeqparError(
            "this model runs seqpar sequence-parallel attention but was called without its plan; "
            "call the model returned by seqpar.model.parallelize with the output of "
            "seqpar.model.shard_batch (model(**shard)).")
    if dropout and module.training:
        raise SeqparError("attention dropout is not supported under sequence parallelism; set "
                          "config.attention_dropout = 0.")
    if getattr(module, "sliding_window", None):
        raise SeqparError("sliding-window attention is not supported by seqpar yet; use a model "
                          "config with sliding_window = None (use_sliding_window=False).")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    kw = dict(causal=True, layout=seqpar_plan.layout, softmax_scale=scaling, doc_ids=seqpar_doc_ids)
    mesh = seqpar_plan.mesh
    if seqpar_plan.algorithm == "ring":
        out = ring_attention(q, k, v, mesh.sp_group, **kw)
    elif seqpar_plan.algorithm == "ulysses":
        out = ulysses_attention(q, k, v, mesh.sp_group, **kw)
    else:
        out = hybrid_attention(q, k, v, mesh, **kw)
    return out, None  # [b, s, h, d], as transformers' attention functions return


def _no_mask(*args, **kwargs):
    """seqpar builds no [s, s] mask: causal and document masks come from positions."""
    return None


def register_attention() -> None:
    """Make `attn_implementation="seqpar"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, seqpar_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _no_mask)


def ulysses_size(plan: SeqParallelPlan) -> int:
    """Ranks that split heads in `plan`'s attention (1: ring only)."""
    return {"ring": 1, "ulysses": plan.mesh.sp_size, "hybrid": plan.mesh.ulysses_size}[plan.algorithm]


def check_model_heads(config, plan: SeqParallelPlan) -> None:
    """Heads vs Ulysses size, before any communication."""
    ulysses = ulysses_size(plan)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    try:
        kv_replication(heads, kv_heads, ulysses)
    except SeqparError as err:
        raise SeqparError(f"attention={plan.algorithm!r} with this model: {err}") from None
