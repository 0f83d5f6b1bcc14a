"""`seqpar.ops.attention`: one differentiable block of attention returning (out, lse).

Each call is served by the kernel `registry.select` picks for the block's device, dtype,
head_dim and mask kind (`masks.classify_mask`): the fastest self-tested backend that
serves it. `attention_backend()` says which backend serves which mask kind.

Blocks whose causal diagonal is shifted are rewritten into parts the fast kernels serve
(see `rewrites`).
"""

from __future__ import annotations

import functools

import torch

from . import registry, rewrites, torch_attention
from .grad import block_vjp
from .masks import MaskKind, check_attention_inputs, classify_mask

attention_delta = torch_attention.attention_delta


def _mask_kind(q, k, mask_kw, kind: MaskKind | None) -> MaskKind:
    if kind is not None:
        return kind
    return classify_mask(q.shape[1], k.shape[1], causal=mask_kw.get("causal", False),
                         q_positions=mask_kw.get("q_positions"), k_positions=mask_kw.get("k_positions"),
                         doc_ids=mask_kw.get("doc_ids"))


def _pick(backend, q) -> rewrites.Pick:
    """`backend` for every part of the block; None: the registry's choice per mask kind."""
    if backend is not None:
        return rewrites.fixed(backend)
    return functools.partial(registry.select, q.device, q.dtype, q.shape[-1])


def run_forward(backend, q, k, v, scale, mask_kw, kind: MaskKind):
    """(out, lse) of one block on `backend` (None: the registry chooses), rewrites applied."""
    return rewrites.run_forward(_pick(backend, q), q, k, v, scale, mask_kw, kind)


def run_backward(backend, dout, q, k, v, out, lse, delta, scale, mask_kw, kind: MaskKind,
                 custom_delta: bool = False, into=None):
    """(dq, dk, dv) of one block on `backend` (None: the registry chooses), rewrites applied
    (added into `into` if given: see `rewrites.run_backward`)."""
    return rewrites.run_backward(_pick(backend, q), dout, q, k, v, out, lse, delta, scale, mask_kw, kind,
                                 custom_delta, into)


def attention_forward(q, k, v, *, softmax_scale=None, mask_kind: MaskKind | None = None, **mask_kw):
    """(out, lse) of one block, no autograd: the building block ring attention merges.

    `mask_kind` may be given by a caller that classified the block already (the ring, on
    host-side positions); otherwise it is computed here from the mask keywords.
    """
    check_attention_inputs(q, k, v)
    return run_forward(None, q, k, v, softmax_scale, mask_kw, _mask_kind(q, k, mask_kw, mask_kind))


def attention_backward(dout, q, k, v, out, lse, *, delta=None, softmax_scale=None,
                       mask_kind: MaskKind | None = None, custom_delta: bool = False, into=None, **mask_kw):
    """(dq, dk, dv) of one block from the final out and lse.

    `delta` = rowsum(dout * out) may be passed precomputed; `custom_delta=True` says it
    carries more than that (a gradient on lse), which only kernels that take delta serve.
    `into`: three accumulators (q's, k's, v's shape, float32 for half inputs) to add the
    gradients into, returned instead of new tensors (ring attention sums its blocks so).
    """
    kind = _mask_kind(q, k, mask_kw, mask_kind)
    return run_backward(None, dout, q, k, v, out, lse, delta, softmax_scale, mask_kw, kind, custom_delta, into)


def attention_backend(device="cpu", dtype=torch.float32, head_dim: int = 64) -> str:
    """Which kernel serves each mask kind for this device/dtype/head_dim (self-tests run)."""
    return registry.plan_summary(torch.device(device), dtype, head_dim)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_kw):
        # Unused outputs get None, not zeros: a zero dlse would mark delta as custom and keep
        # the library kernels (which compute delta themselves) from serving the backward.
        ctx.set_materialize_grads(False)
        kind = _mask_kind(q, k, mask_kw, None)
        out, lse = attention_forward(q, k, v, mask_kind=kind, **mask_kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask_kw, ctx.kind = mask_kw, kind
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors

        def kernel(dout, delta, custom_delta):
            return attention_backward(dout, q, k, v, out, lse, delta=delta, mask_kind=ctx.kind,
                                      custom_delta=custom_delta, **ctx.mask_kw)

        return (*block_vjp(dout, dlse, q, k, v, out, kernel), None)


def attention(q, k, v, *, causal=False, softmax_scale=None, q_positions=None,
              k_positions=None, doc_ids=None):
    """One block of attention, differentiable in q, k, v (and through lse).

    q [b, sq, hq, d], k/v [b, sk, hk, d] (hq % hk == 0). Causal masking and packed
    documents come from explicit global `q_positions`/`k_positions` ([s] or [b, s]) and
    `doc_ids` (one tensor when sq == sk, else a (q_doc_ids, k_doc_ids) pair).
    Returns (out [b, sq, hq, d], lse [b, hq, sq] float32; float64 for float64 input).
    """
    mask_kw = dict(causal=causal, softmax_scale=softmax_scale, q_positions=q_positions,
                   k_positions=k_positions, doc_ids=doc_ids)
    return _Attention.apply(q, k, v, mask_kw)
