"""`seqpar.ops.attention`: one differentiable block of attention returning (out, lse).

Dispatch order (DESIGN.md): compiled seqpar op (CUDA or CPU, built from csrc/ on first
use, see `_build`) -> pure torch (no compiler, SEQPAR_DISABLE_EXT=1, or a device/dtype
the compiled op does not serve, e.g. float32 on CUDA). `attention_backend()` says which
one is active and benchmarks print it.
"""

from __future__ import annotations

import torch

from . import compiled, torch_attention


def attention_backend() -> str:
    """Local attention kernel in use: 'compiled-cuda', 'compiled-cpu' or 'torch' (fallback)."""
    return compiled.backend_name()


def attention_forward(q, k, v, **mask_kw):
    """(out, lse) of one block, no autograd: the building block ring attention merges."""
    if compiled.available(q.device, q.dtype, head_dim=q.shape[-1]):
        return compiled.attention_forward(q, k, v, **mask_kw)
    return torch_attention.attention_forward(q, k, v, **mask_kw)


def attention_backward(dout, q, k, v, out, lse, *, delta=None, **mask_kw):
    """(dq, dk, dv) of one block from the final lse, in the accumulation dtype."""
    if compiled.available(q.device, q.dtype, head_dim=q.shape[-1]):
        return compiled.attention_backward(dout, q, k, v, out, lse, delta=delta, **mask_kw)
    return torch_attention.attention_backward(dout, q, k, v, out, lse, delta=delta, **mask_kw)


attention_delta = torch_attention.attention_delta


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_kw):
        out, lse = attention_forward(q, k, v, **mask_kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask_kw = mask_kw
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        delta = attention_delta(dout, out)
        if dlse is not None:
            # d lse / d score = p, so a gradient on lse enters as a shift of delta.
            delta = delta - dlse.to(delta.dtype)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, delta=delta, **ctx.mask_kw)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


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
