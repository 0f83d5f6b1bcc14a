"""Input checks and the attention mask built from explicit token positions.

Masks come from *global* sequence positions and document ids, never from a local
arange: a zigzag or stripe shard, or a block of another rank's keys, is masked exactly
as the same tokens would be in the unsharded sequence.
"""

from __future__ import annotations

import torch

from ..errors import SeqparError


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise SeqparError(
            f"attention expects bshd tensors [batch, seq, heads, head_dim]; got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}. Transpose Hugging Face [b, h, s, d] with .transpose(1, 2).")
    if not (q.dtype == k.dtype == v.dtype):
        raise SeqparError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them to one dtype.")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise SeqparError(
            f"q, k, v must share head_dim; got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}.")
    if k.shape != v.shape:
        raise SeqparError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0]:
        raise SeqparError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}.")
    if q.shape[2] % k.shape[2] != 0:
        raise SeqparError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for GQA/MQA.")


def split_doc_ids(doc_ids, sq: int, sk: int):
    """doc_ids is one tensor (self-attention, sq == sk) or a (q_doc_ids, k_doc_ids) pair."""
    if doc_ids is None:
        return None, None
    if isinstance(doc_ids, (tuple, list)):
        return doc_ids[0], doc_ids[1]
    if sq != sk:
        raise SeqparError("one doc_ids tensor needs sq == sk; pass (q_doc_ids, k_doc_ids) for a cross block.")
    return doc_ids, doc_ids


def _as_2d(t: torch.Tensor, device) -> torch.Tensor:
    t = t.to(device)
    return t[None] if t.dim() == 1 else t


def block_mask(sq: int, sk: int, *, causal: bool, q_positions=None, k_positions=None,
               doc_ids=None, device=None) -> torch.Tensor | None:
    """Boolean mask [b or 1, sq, sk] (True = query may attend key), or None for no mask.

    Without explicit positions, queries are aligned to the end of the keys (bottom-right,
    as flash-attn does), which is the usual diagonal when sq == sk.
    """
    q_doc, k_doc = split_doc_ids(doc_ids, sq, sk)
    mask = None
    if causal:
        qp = q_positions if q_positions is not None else torch.arange(sq, device=device) + (sk - sq)
        kp = k_positions if k_positions is not None else torch.arange(sk, device=device)
        mask = _as_2d(kp, device)[:, None, :] <= _as_2d(qp, device)[:, :, None]
    if q_doc is not None:
        same_doc = _as_2d(q_doc, device)[:, :, None] == _as_2d(k_doc, device)[:, None, :]
        mask = same_doc if mask is None else (mask & same_doc)
    return mask
