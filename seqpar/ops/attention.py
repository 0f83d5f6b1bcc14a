"""`seqpar.ops.attention`: one differentiable block of attention returning (out, lse).

Each call is served by the kernel `registry.select` picks for the block's device, dtype,
head_dim and mask kind (`masks.classify_mask`): the fastest self-tested backend that
serves it. `attention_backend()` says which backend serves which mask kind.

One rewrite widens what library kernels serve: a causal diagonal shifted below the main
one (row i sees keys j <= i + offset, offset < 0; the stripe layout's blocks) is the
aligned diagonal on rows [-offset:] and keys [:sq + offset]; the first rows see nothing
(out 0, lse -inf), and keys past the cut get no gradient.

A second one, when a faster kernel serves the parts than the whole: a diagonal above the
main one (offset > 0: the ring's bottom-right blocks, which SDPA's top-left `is_causal`
cannot express) is keys [:offset], seen by every row (no mask), plus keys [offset:] on
the aligned diagonal. The forward merges the two (out, lse) pairs; the backward, which
takes the final out and lse, is the sum over the two key ranges.
"""

from __future__ import annotations

import torch

from . import registry, torch_attention
from .masks import BOTTOM_RIGHT, CAUSAL, EMPTY, NONE, SHIFTED, TOP_LEFT, MaskKind, check_attention_inputs, classify_mask
from .dtypes import accumulate_dtype
from .grad import block_vjp

attention_delta = torch_attention.attention_delta


def _mask_kind(q, k, mask_kw, kind: MaskKind | None) -> MaskKind:
    if kind is not None:
        return kind
    return classify_mask(q.shape[1], k.shape[1], causal=mask_kw.get("causal", False),
                         q_positions=mask_kw.get("q_positions"), k_positions=mask_kw.get("k_positions"),
                         doc_ids=mask_kw.get("doc_ids"))


def _drop_rows(kind: MaskKind, sq: int, sk: int):
    """(rows dropped, keys kept, aligned kind) for a diagonal below the main one, else None."""
    if kind.offset >= 0 or kind.kind not in (EMPTY, "causal-shifted"):
        return None
    drop = min(sq, -kind.offset)
    keep = min(sk, sq - drop)
    aligned = MaskKind(CAUSAL if keep == sq - drop else TOP_LEFT)
    return drop, keep, aligned


def _split_keys(q, kind: MaskKind, sk: int, custom_delta: bool = False):
    """(keys every row sees, aligned kind of the rest) for a diagonal above the main one,
    when the kernel for unmasked blocks is not the one that would serve the whole block."""
    if kind.offset <= 0 or kind.kind not in (BOTTOM_RIGHT, SHIFTED) or kind.offset >= sk:
        return None
    key = (q.device, q.dtype, q.shape[-1])
    if registry.select(*key, NONE, custom_delta, record=False) is \
            registry.select(*key, kind.kind, custom_delta, record=False):
        return None
    sq, rest = q.shape[1], sk - kind.offset
    return kind.offset, MaskKind(CAUSAL if rest == sq else TOP_LEFT)


def _top_left_mask(q, sk: int) -> dict:
    """Top-left causal as explicit positions too: kernels that read positions default to
    bottom-right when sq != sk; library kernels go by the kind."""
    if q.shape[1] == sk:
        return {"causal": True}
    return {"causal": True, "q_positions": torch.arange(q.shape[1], device=q.device),
            "k_positions": torch.arange(sk, device=q.device)}


def _merge(parts, dtype):
    """(out, lse) of attention over the union of the parts' keys."""
    (o1, l1), (o2, l2) = parts
    lse = torch.logaddexp(l1, l2)
    w1, w2 = ((l - lse).exp().transpose(1, 2).unsqueeze(-1) for l in (l1, l2))  # [b, s, h, 1]
    return (o1.to(w1.dtype) * w1 + o2.to(w2.dtype) * w2).to(dtype), lse


def run_forward(backend, q, k, v, scale, mask_kw, kind: MaskKind):
    """(out, lse) of one block on `backend` (None: the registry chooses), rewrites applied."""
    sq, sk = q.shape[1], k.shape[1]
    cut = _drop_rows(kind, sq, sk)
    if cut is not None or kind.kind == EMPTY:
        drop, keep, aligned = cut if cut is not None else (sq, 0, kind)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], sq), float("-inf"), dtype=accumulate_dtype(q.dtype),
                         device=q.device)
        if drop < sq and keep > 0:
            out[:, drop:], lse[..., drop:] = run_forward(backend, q[:, drop:], k[:, :keep], v[:, :keep],
                                                         scale, _top_left_mask(q[:, drop:], keep), aligned)
        return out, lse
    split = _split_keys(q, kind, sk) if backend is None else None
    if split is not None:
        p, aligned = split
        return _merge([run_forward(None, q, k[:, :p], v[:, :p], scale, {}, MaskKind(NONE)),
                       run_forward(None, q, k[:, p:], v[:, p:], scale, _top_left_mask(q, sk - p), aligned)],
                      q.dtype)
    backend = backend or registry.select(q.device, q.dtype, q.shape[-1], kind.kind)
    return backend.forward(q, k, v, scale, {**mask_kw, "kind": kind})


def run_backward(backend, dout, q, k, v, out, lse, delta, scale, mask_kw, kind: MaskKind,
                 custom_delta: bool = False):
    """(dq, dk, dv) of one block on `backend` (None: the registry chooses), rewrites applied."""
    sq, sk = q.shape[1], k.shape[1]
    cut = _drop_rows(kind, sq, sk)
    if cut is not None or kind.kind == EMPTY:
        drop, keep, aligned = cut if cut is not None else (sq, 0, kind)
        acc = accumulate_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        if drop < sq and keep > 0:
            part = run_backward(backend, dout[:, drop:], q[:, drop:], k[:, :keep], v[:, :keep],
                                out[:, drop:], lse[..., drop:], None if delta is None else delta[..., drop:],
                                scale, _top_left_mask(q[:, drop:], keep), aligned, custom_delta)
            dq[:, drop:], dk[:, :keep], dv[:, :keep] = part
        return dq, dk, dv
    split = _split_keys(q, kind, sk, custom_delta) if backend is None else None
    if split is not None:
        p, aligned = split
        acc = accumulate_dtype(q.dtype)
        seen = run_backward(None, dout, q, k[:, :p], v[:, :p], out, lse, delta, scale, {},
                            MaskKind(NONE), custom_delta)
        diag = run_backward(None, dout, q, k[:, p:], v[:, p:], out, lse, delta, scale,
                            _top_left_mask(q, sk - p), aligned, custom_delta)
        return (seen[0].to(acc) + diag[0].to(acc),
                *(torch.cat([a.to(acc), b.to(acc)], dim=1) for a, b in zip(seen[1:], diag[1:])))
    backend = backend or registry.select(q.device, q.dtype, q.shape[-1], kind.kind, custom_delta)
    return backend.backward(dout, q, k, v, out, lse, delta, scale, {**mask_kw, "kind": kind})


def attention_forward(q, k, v, *, softmax_scale=None, mask_kind: MaskKind | None = None, **mask_kw):
    """(out, lse) of one block, no autograd: the building block ring attention merges.

    `mask_kind` may be given by a caller that classified the block already (the ring, on
    host-side positions); otherwise it is computed here from the mask keywords.
    """
    check_attention_inputs(q, k, v)
    return run_forward(None, q, k, v, softmax_scale, mask_kw, _mask_kind(q, k, mask_kw, mask_kind))


def attention_backward(dout, q, k, v, out, lse, *, delta=None, softmax_scale=None,
                       mask_kind: MaskKind | None = None, custom_delta: bool = False, **mask_kw):
    """(dq, dk, dv) of one block from the final out and lse.

    `delta` = rowsum(dout * out) may be passed precomputed; `custom_delta=True` says it
    carries more than that (a gradient on lse), which only kernels that take delta serve.
    """
    kind = _mask_kind(q, k, mask_kw, mask_kind)
    return run_backward(None, dout, q, k, v, out, lse, delta, softmax_scale, mask_kw, kind, custom_delta)


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
