"""Packed documents as variable-length sequences, the form FlashAttention's varlen ops take.

`varlen_from_doc_ids(doc_ids)` turns a [b, s] block of packed documents (each document
one contiguous run of a row, as `seqpar.data` packs them) into cumulative sequence
lengths over the flattened b*s tokens: segment i is tokens [cu[i], cu[i+1]). Attention
restricted to same-document keys (and causal inside each) is then attention per segment.

`varlen_attention_reference` has the signature of `aten._flash_attention_forward` (q, k,
v as [total, heads, d], cu_seqlens_q/k, max_q, max_k, dropout, is_causal, scale) and
computes it in pure torch per segment, so the construction is tested on the CPU against
the oracle's document mask.
"""

from __future__ import annotations

import torch

from .reference import attention_reference


def varlen_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [segments + 1], longest segment) of a [b, s] (or [s]) doc-id block."""
    doc_ids = doc_ids if doc_ids.dim() == 2 else doc_ids[None]
    b, s = doc_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # a new document, or a new row
    begin = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([begin, torch.tensor([b * s], device=doc_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p,
                               is_causal, *, scale=None):
    """Pure-torch stand-in for `aten._flash_attention_forward` on [total, h, d] tensors:
    (out [total_q, hq, d], lse [hq, total_q]), attention inside each segment."""
    assert dropout_p == 0.0
    outs, lses = [], []
    for i in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        out, lse = attention_reference(q[None, qs], k[None, ks], v[None, ks], causal=is_causal,
                                       softmax_scale=scale)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)
