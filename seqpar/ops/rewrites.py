"""Mask rewrites that widen what the fast kernels serve, and the two calls that apply
them: `run_forward` / `run_backward` of one block on the backends `pick` chooses.

One rewrite widens what library kernels serve: a causal diagonal shifted below the main
one (row i sees keys j <= i + offset, offset < 0; the stripe layout's blocks) is the
aligned diagonal on rows [-offset:] and keys [:sq + offset]; the first rows see nothing
(out 0, lse -inf), and keys past the cut get no gradient.

A second one, when a faster kernel serves the parts than the whole: a diagonal above the
main one (offset > 0: the ring's bottom-right blocks, which SDPA's top-left `is_causal`
cannot express) is keys [:offset], seen by every row (no mask), plus keys [offset:] on
the aligned diagonal. The forward merges the two (out, lse) pairs; the backward, which
takes the final out and lse, is the sum over the two key ranges.

`pick(kind, custom_delta=False, record=True)` returns the backend for a mask kind of
this block's (device, dtype, head_dim): `seqpar.ops.attention` passes the registry's
choice, the registry's self-test one fixed backend (so the split above never applies).
"""

from __future__ import annotations

from typing import Callable

import torch

from .dtypes import accumulate_dtype
from .masks import BOTTOM_RIGHT, CAUSAL, EMPTY, NONE, SHIFTED, TOP_LEFT, MaskKind

Pick = Callable[..., object]  # (kind, custom_delta=False, record=True) -> backends.Backend


def fixed(backend) -> Pick:
    """A `pick` that always answers `backend`."""
    return lambda kind, custom_delta=False, record=True: backend


def _drop_rows(kind: MaskKind, sq: int, sk: int):
    """(rows dropped, keys kept, aligned kind) for a diagonal below the main one, else None."""
    if kind.offset >= 0 or kind.kind not in (EMPTY, "causal-shifted"):
        return None
    drop = min(sq, -kind.offset)
    keep = min(sk, sq - drop)
    aligned = MaskKind(CAUSAL if keep == sq - drop else TOP_LEFT)
    return drop, keep, aligned


def _split_keys(pick: Pick, q, kind: MaskKind, sk: int, custom_delta: bool = False):
    """(keys every row sees, aligned kind of the rest) for a diagonal above the main one,
    when the kernel for unmasked blocks is not the one that would serve the whole block."""
    if kind.offset <= 0 or kind.kind not in (BOTTOM_RIGHT, SHIFTED) or kind.offset >= sk:
        return None
    if pick(NONE, custom_delta, record=False) is pick(kind.kind, custom_delta, record=False):
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


def run_forward(pick: Pick, q, k, v, scale, mask_kw, kind: MaskKind):
    """(out, lse) of one block on the kernels `pick` chooses, rewrites applied."""
    sq, sk = q.shape[1], k.shape[1]
    cut = _drop_rows(kind, sq, sk)
    if cut is not None or kind.kind == EMPTY:
        drop, keep, aligned = cut if cut is not None else (sq, 0, kind)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], sq), float("-inf"), dtype=accumulate_dtype(q.dtype),
                         device=q.device)
        if drop < sq and keep > 0:
            out[:, drop:], lse[..., drop:] = run_forward(pick, q[:, drop:], k[:, :keep], v[:, :keep],
                                                         scale, _top_left_mask(q[:, drop:], keep), aligned)
        return out, lse
    split = _split_keys(pick, q, kind, sk)
    if split is not None:
        p, aligned = split
        return _merge([run_forward(pick, q, k[:, :p], v[:, :p], scale, {}, MaskKind(NONE)),
                       run_forward(pick, q, k[:, p:], v[:, p:], scale, _top_left_mask(q, sk - p), aligned)],
                      q.dtype)
    return pick(kind.kind).forward(q, k, v, scale, {**mask_kw, "kind": kind})


def run_backward(pick: Pick, dout, q, k, v, out, lse, delta, scale, mask_kw, kind: MaskKind,
                 custom_delta: bool = False, into=None):
    """(dq, dk, dv) of one block on the kernels `pick` chooses, rewrites applied.

    With `into` (tensors of q's, k's and v's shape in the accumulate dtype) the gradients
    are added into them, part by part, and `into` is returned: a caller summing blocks
    (ring attention) then holds no float32 copy of a block beside its own sums."""
    sq, sk = q.shape[1], k.shape[1]
    cut = _drop_rows(kind, sq, sk)
    split = None if cut is not None or kind.kind == EMPTY else _split_keys(pick, q, kind, sk, custom_delta)
    if cut is None and kind.kind != EMPTY and split is None:
        grads = pick(kind.kind, custom_delta).backward(dout, q, k, v, out, lse, delta, scale,
                                                       {**mask_kw, "kind": kind})
        if into is None:
            return grads
        for total, grad in zip(into, grads):
            total.add_(grad)
        return into
    if into is None:
        acc = accumulate_dtype(q.dtype)
        into = tuple(torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
    dq, dk, dv = into
    if split is not None:  # the keys every row sees, then the causal rest
        p, aligned = split
        run_backward(pick, dout, q, k[:, :p], v[:, :p], out, lse, delta, scale, {}, MaskKind(NONE),
                     custom_delta, (dq, dk[:, :p], dv[:, :p]))
        run_backward(pick, dout, q, k[:, p:], v[:, p:], out, lse, delta, scale, _top_left_mask(q, sk - p),
                     aligned, custom_delta, (dq, dk[:, p:], dv[:, p:]))
        return into
    drop, keep, aligned = cut if cut is not None else (sq, 0, kind)  # rows that see no key
    if drop < sq and keep > 0:
        run_backward(pick, dout[:, drop:], q[:, drop:], k[:, :keep], v[:, :keep], out[:, drop:],
                     lse[..., drop:], None if delta is None else delta[..., drop:], scale,
                     _top_left_mask(q[:, drop:], keep), aligned, custom_delta,
                     (dq[:, drop:], dk[:, :keep], dv[:, :keep]))
    return into
