"""`shard_batch`: one rank's slice of a causal-LM batch under sequence parallelism.

Labels are shifted on the FULL sequence before slicing, so the last token of one shard
still predicts the first token of the next. Position ids are global (reset per packed
document), and packed batches carry document ids so attention and the loss never cross
a document boundary.
"""

from __future__ import annotations

import torch

from ..errors import SeqparError
from ..parallel import check_layout, shard

IGNORE_INDEX = -100


def _document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A document starts wherever its position id restarts at 0."""
    return torch.cumsum((position_ids == 0).long(), dim=1)


def shift_labels(labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """target[t] = labels[t + 1]; the last token, and a document's last token (whose
    next token starts another document), predict nothing."""
    target = torch.full_like(labels, ignore_index)
    target[:, :-1] = labels[:, 1:]
    if doc_ids is not None:
        target[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = ignore_index
    return target


def prepare_batch(batch, ignore_index: int = IGNORE_INDEX) -> dict:
    """Full-sequence input_ids, shifted labels, global position_ids and doc ids (or None)."""
    if "input_ids" not in batch:
        raise SeqparError("shard_batch needs batch['input_ids'] of shape [batch, seq].")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise SeqparError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
    for name in ("labels", "position_ids", "attention_mask", "doc_ids"):
        value = batch.get(name)
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise SeqparError(f"batch['{name}'] has shape {tuple(value.shape)} but input_ids has "
                              f"{tuple(input_ids.shape)}; they must match.")
    labels = batch.get("labels")
    labels = input_ids.clone() if labels is None else labels.clone()
    attention_mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    doc_ids = batch.get("doc_ids")
    if position_ids is None:
        if doc_ids is not None:  # position within each document
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
            position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
        elif attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if doc_ids is None and bool(((position_ids == 0).sum(1) > 1).any()):
        doc_ids = _document_ids(position_ids)
    if attention_mask is not None and not bool(attention_mask.all()):
        # Padding: its own document (-1), never a target, never attended by real tokens.
        base = doc_ids if doc_ids is not None else torch.zeros_like(input_ids)
        doc_ids = torch.where(attention_mask.bool(), base, torch.full_like(base, -1))
        labels = labels.masked_fill(~attention_mask.bool(), ignore_index)
    return dict(input_ids=input_ids, labels=shift_labels(labels, doc_ids, ignore_index),
                position_ids=position_ids.contiguous(), doc_ids=doc_ids)


def shard_batch(batch, mesh, *, layout: str = "zigzag", ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's slice of `batch` for `model(**shard)` on a parallelized model.

    `batch` holds `input_ids` [b, S] and optionally `labels` (unshifted, as for any HF
    causal LM; default input_ids), `position_ids` (restarting at 0 at each packed
    document), `doc_ids`, `attention_mask` (padding). Returns `input_ids`, `labels`
    (already shifted: do not shift again), `position_ids` and, for packed or padded
    batches, `doc_ids`, each [b, S / sp_size] under `layout` (same as `parallelize`).
    """
    full = prepare_batch(batch, ignore_index)
    check_layout(full["input_ids"].shape[1], mesh.sp_size, layout)
    out = {name: shard(value, mesh.sp_group, dim=1, layout=layout)
           for name, value in full.items() if value is not None}
    return out
