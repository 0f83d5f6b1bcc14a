"""Pure-torch block attention: forward returning (out, lse) and a recompute backward.

This is the fallback local kernel when the compiled seqpar op is not available, and the
shape of the contract the compiled op implements: the backward takes the *final* lse
(and optionally delta = rowsum(dout * out)) so ring attention can call it on every block
with the merged statistics, as flash-attention's backward does.

Queries are processed in chunks so the float32 score matrix never exceeds
`_MAX_SCORE_ELEMENTS` per chunk (the full [sq, sk] matrix is never stored at once).
"""

from __future__ import annotations

import math

import torch

from .dtypes import accumulate_dtype
from .masks import block_mask, check_attention_inputs, split_doc_ids

_MAX_SCORE_ELEMENTS = 1 << 25  # 32M float32 scores (128 MiB) per query chunk


def _chunks(b: int, sq: int, sk: int, hq: int):
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, b * hq * sk))
    for start in range(0, sq, rows):
        yield start, min(sq, start + rows)


def _slice_rows(t, start: int, stop: int):
    return None if t is None else t[..., start:stop]


def _masked_scores(q_chunk, k, scale, acc, mask_args, start, stop):
    b, c, hq, d = q_chunk.shape
    hk = k.shape[2]
    qg = q_chunk.to(acc).reshape(b, c, hk, hq // hk, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    causal, q_pos, k_pos, q_doc, k_doc = mask_args
    mask = block_mask(
        c, k.shape[1], causal=causal,
        q_positions=_slice_rows(q_pos, start, stop), k_positions=k_pos,
        doc_ids=None if q_doc is None else (_slice_rows(q_doc, start, stop), k_doc),
        device=q_chunk.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    return qg, scores


def _mask_args(q, k, causal, q_positions, k_positions, doc_ids):
    """Positions made explicit (so query chunks can slice them) plus split doc ids."""
    sq, sk = q.shape[1], k.shape[1]
    q_doc, k_doc = split_doc_ids(doc_ids, sq, sk)
    if causal and q_positions is None:
        q_positions = torch.arange(sq, device=q.device) + (sk - sq)
    if causal and k_positions is None:
        k_positions = torch.arange(sk, device=q.device)
    return (causal, q_positions, k_positions, q_doc, k_doc)


def attention_forward(q, k, v, *, causal=False, softmax_scale=None, q_positions=None,
                      k_positions=None, doc_ids=None):
    """One block of attention: (out in q.dtype, lse [b, hq, sq] float32/float64)."""
    check_attention_inputs(q, k, v)
    b, sq, hq, d = q.shape
    hk = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = accumulate_dtype(q.dtype)
    margs = _mask_args(q, k, causal, q_positions, k_positions, doc_ids)
    out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hk, hq // hk, sq, dtype=acc, device=q.device)
    for start, stop in _chunks(b, sq, k.shape[1], hq):
        _, scores = _masked_scores(q[:, start:stop], k, scale, acc, margs, start, stop)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        probs = torch.exp(scores - row_max)
        sum_exp = probs.sum(dim=-1, keepdim=True)
        chunk_lse = row_max + torch.log(sum_exp)  # -inf where the row saw no key
        probs = probs / torch.where(sum_exp == 0, torch.ones_like(sum_exp), sum_exp)
        chunk_out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc))
        out[:, start:stop] = chunk_out.reshape(b, stop - start, hq, d).to(q.dtype)
        lse[..., start:stop] = chunk_lse.squeeze(-1)
    return out, lse.reshape(b, hq, sq)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None,
                       q_positions=None, k_positions=None, doc_ids=None, delta=None):
    """Gradients of one block given the final (merged) lse: (dq, dk, dv) in float32/64.

    `delta` = rowsum(dout * out) [b, hq, sq]; computed here when not given. dk/dv have
    k's (unexpanded) head count: GQA groups are summed inside the einsum.
    """
    b, sq, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = accumulate_dtype(q.dtype)
    margs = _mask_args(q, k, causal, q_positions, k_positions, doc_ids)
    if delta is None:
        delta = attention_delta(dout, out)
    lse_g = lse.to(acc).reshape(b, hk, group, sq)
    delta_g = delta.to(acc).reshape(b, hk, group, sq)
    # Rows with lse = -inf saw no key anywhere: their probabilities are 0, not NaN.
    lse_g = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), lse_g)
    dq = torch.empty(b, sq, hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    v_acc = v.to(acc)
    k_acc = k.to(acc)
    for start, stop in _chunks(b, sq, k.shape[1], hq):
        qg, scores = _masked_scores(q[:, start:stop], k, scale, acc, margs, start, stop)
        probs = torch.exp(scores - lse_g[..., start:stop, None])
        do = dout[:, start:stop].to(acc).reshape(b, stop - start, hk, group, d)
        dv += torch.einsum("bhgqk,bqhgd->bkhd", probs, do)
        dprobs = torch.einsum("bqhgd,bkhd->bhgqk", do, v_acc)
        dscores = probs * (dprobs - delta_g[..., start:stop, None]) * scale
        dq[:, start:stop] = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k_acc).reshape(b, stop - start, hq, d)
        dk += torch.einsum("bhgqk,bqhgd->bkhd", dscores, qg)
    return dq, dk, dv


def attention_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dout * out) as [b, hq, sq] in the accumulation dtype."""
    acc = accumulate_dtype(out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)
