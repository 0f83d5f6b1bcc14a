"""Input checks and the attention mask built from explicit token positions.

Masks come from *global* sequence positions and document ids, never from a local
arange: a zigzag or stripe shard, or a block of another rank's keys, is masked exactly
as the same tokens would be in the unsharded sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ---------------------------------------------------------------- mask kinds
# What a kernel must support to serve a block. Library kernels (PyTorch's fused ops,
# flash-attn) know only "no mask" and a causal diagonal; seqpar's own ops and pure torch
# take arbitrary positions and documents. Row i of a causal block sees key j iff
# j <= i + offset whenever both positions are sorted, so a diagonal is one integer.
NONE, CAUSAL = "none", "causal"                      # causal: sq == sk, offset 0
TOP_LEFT, BOTTOM_RIGHT = "causal-top-left", "causal-bottom-right"  # sq != sk: offset 0 / sk - sq
SHIFTED = "causal-shifted"                           # any other constant offset (stripe layout)
DOCUMENTS = "documents"                              # self block of packed documents (+ causal diagonal)
POSITIONS = "positions"                              # anything else: explicit positions / doc ids
EMPTY = "empty"                                      # no query sees any key
MASK_KINDS = (NONE, CAUSAL, TOP_LEFT, BOTTOM_RIGHT, SHIFTED, DOCUMENTS, POSITIONS)


@dataclass(frozen=True)
class MaskKind:
    kind: str
    offset: int = 0       # causal kinds: query row i sees key rows j <= i + offset
    causal: bool = False  # DOCUMENTS: also causal on the diagonal inside each document


def _one_row(t: torch.Tensor | None) -> torch.Tensor | None:
    """A [s] CPU copy of positions given as [s] or [b, s] with equal rows; None if rows differ."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dim() == 2:
        if not bool((t == t[:1]).all()):
            return None
        t = t[0]
    return t


def _diagonal_offset(sq: int, sk: int, q_pos, k_pos) -> MaskKind:
    """Classify a causal mask from positions: a constant diagonal offset, or general."""
    q_pos = torch.arange(sq) + (sk - sq) if q_pos is None else q_pos
    k_pos = torch.arange(sk) if k_pos is None else k_pos
    if sk > 1 and not bool((k_pos[1:] > k_pos[:-1]).all()):
        return MaskKind(POSITIONS)
    seen = torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True)  # keys row i sees
    if bool((seen == sk).all()):
        return MaskKind(NONE)
    if bool((seen == 0).all()):
        return MaskKind(EMPTY)
    inside = ((seen > 0) & (seen < sk)).nonzero()
    if len(inside) == 0:
        return MaskKind(POSITIONS)
    i = int(inside[0])
    offset = int(seen[i]) - 1 - i
    if not torch.equal(seen, (torch.arange(sq) + offset + 1).clamp(0, sk)):
        return MaskKind(POSITIONS)
    if offset == 0:
        return MaskKind(CAUSAL if sq == sk else TOP_LEFT)
    if offset == sk - sq and offset > 0:
        return MaskKind(BOTTOM_RIGHT, offset)
    return MaskKind(SHIFTED, offset)


def _is_run_of_documents(doc: torch.Tensor) -> bool:
    """Each document is one contiguous run per row (packing's layout), so segments are unique."""
    for row in doc:
        runs = torch.unique_consecutive(row)
        if len(runs) != len(torch.unique(runs)):
            return False
    return True


def _causal_kind(sq: int, sk: int, q_positions, k_positions) -> MaskKind:
    q_pos, k_pos = _one_row(q_positions), _one_row(k_positions)
    if (q_positions is not None and q_pos is None) or (k_positions is not None and k_pos is None):
        return MaskKind(POSITIONS)  # positions differ across the batch
    return _diagonal_offset(sq, sk, q_pos, k_pos)


def classify_mask(sq: int, sk: int, *, causal: bool, q_positions=None, k_positions=None,
                  doc_ids=None) -> MaskKind:
    """The mask kind of one block (host-side; positions/doc ids are copied to the CPU)."""
    if doc_ids is not None:
        q_doc, k_doc = (_as_2d(t, "cpu") for t in split_doc_ids(doc_ids, sq, sk))
        self_block = sq == sk and q_doc.shape == k_doc.shape and torch.equal(q_doc, k_doc)
        if not self_block or not _is_run_of_documents(q_doc):
            return MaskKind(POSITIONS)
        if causal and _causal_kind(sq, sk, q_positions, k_positions).kind != CAUSAL:
            return MaskKind(POSITIONS)
        return MaskKind(DOCUMENTS, causal=causal)
    if not causal:
        return MaskKind(NONE)
    return _causal_kind(sq, sk, q_positions, k_positions)
