"""The oracle: plain attention on one block, written for clarity, not speed.

Every parallel algorithm and every compiled kernel is tested against this function on
the unsharded tensors. It is differentiable through ordinary autograd and exact in
float64; in bf16/fp16 it accumulates in float32.

Layout is bshd: q [b, sq, hq, d], k/v [b, sk, hk, d] with hq % hk == 0 (GQA/MQA).
Returns (out [b, sq, hq, d] in q's dtype, lse [b, hq, sq]) where lse is the natural-log
sum-exp of the *scaled* scores; it is float64 for float64 inputs and float32 otherwise.
A query that sees no key (fully masked row) gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import math

import torch

from .dtypes import accumulate_dtype
from .masks import block_mask, check_attention_inputs


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    doc_ids=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_inputs(q, k, v)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = accumulate_dtype(q.dtype)

    # GQA without expanding K/V: view q as [b, sq, hk, group, d] and broadcast k over group.
    qg = q.to(acc).reshape(b, sq, hk, group, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale

    mask = block_mask(sq, sk, causal=causal, q_positions=q_positions,
                      k_positions=k_positions, doc_ids=doc_ids, device=q.device)
    if mask is not None:  # mask: [b or 1, sq, sk], True = attend
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))

    # Stable log-sum-exp that stays finite (and has finite gradients) for empty rows.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    empty = torch.isinf(row_max) & (row_max < 0)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    exp_scores = torch.exp(scores - row_max)
    sum_exp = exp_scores.sum(dim=-1, keepdim=True)
    safe_sum = torch.where(empty, torch.ones_like(sum_exp), sum_exp)
    probs = exp_scores / safe_sum
    lse = torch.where(empty, torch.full_like(row_max, float("-inf")), row_max + torch.log(safe_sum))

    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc)).reshape(b, sq, hq, d)
    lse = lse.squeeze(-1).reshape(b, hq, sq)
    return out.to(q.dtype), lse
