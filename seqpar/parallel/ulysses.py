"""Ulysses attention: trade the sequence shard for a head shard with one all-to-all,
run ordinary attention over the whole sequence for H/P heads, and trade back.

GQA rule (P = Ulysses size, hq query heads, hk key/value heads):
- hq must be divisible by P (each rank owns hq/P query heads);
- if hk % P == 0, K/V heads are split like query heads (no copy);
- else if P % hk == 0, each K/V head is replicated P/hk times, the least that gives
  every rank the one K/V head its query heads use (never the full hq expansion);
- otherwise there is no exact split: raise, naming the fix.
K and V travel in one all-to-all (stacked on the last dim), so one forward issues three
all-to-alls (q, kv, out) and one backward three (dout, dq, dkv).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..ops import attention
from ..ops.masks import check_attention_inputs
from .comm import all_gather, all_to_all
from .kernels import agree_on_kernels
from .layout import check_layout, shard_positions


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h, d] sequence shard -> [b, P*s, h/P, d] head shard (shards in rank order)."""
    world = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    all_to_all(recv, send, group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def _heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: [b, P*s, h/P, d] -> [b, s, h, d]."""
    world = dist.get_world_size(group)
    b, total, hp, d = y.shape
    s = total // world
    send = y.reshape(b, world, s, hp, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    all_to_all(recv, send, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * hp, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x, group):
    return x if dist.get_world_size(group) == 1 else _SeqToHeads.apply(x, group)


def heads_to_seq(y, group):
    return y if dist.get_world_size(group) == 1 else _HeadsToSeq.apply(y, group)


def kv_replication(q_heads: int, kv_heads: int, world: int) -> int:
    """How many copies of each K/V head the Ulysses split needs (see module doc)."""
    if q_heads % world != 0:
        raise SeqparError(
            f"{q_heads} query heads are not divisible by the Ulysses size {world}; choose a "
            f"Ulysses size that divides {q_heads} (or use ring attention for the rest of SP).")
    if kv_heads % world == 0:
        return 1
    if world % kv_heads == 0:
        return world // kv_heads
    raise SeqparError(
        f"{kv_heads} key/value heads cannot be split over Ulysses size {world}: one must divide "
        f"the other; choose a Ulysses size that divides or is a multiple of {kv_heads}.")


def heads_to_ranks(q, k, v, group):
    """Sequence-sharded q/k/v -> full-sequence, head-sharded q, k, v (differentiable)."""
    world = dist.get_world_size(group)
    copies = kv_replication(q.shape[2], k.shape[2], world)
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    b, s, hk, d = k.shape
    kv = torch.stack([k, v], dim=3).reshape(b, s, hk, 2 * d)  # one message for K and V
    q_h = seq_to_heads(q, group)
    kv_h = seq_to_heads(kv, group).reshape(b, world * s, hk // world, 2, d)
    return q_h, kv_h[..., 0, :], kv_h[..., 1, :]


def gather_doc_ids(doc_ids, batch: int, group):
    """This group's document ids in the order `seq_to_heads` concatenates shards."""
    if doc_ids is None:
        return None
    doc_ids = doc_ids.to(torch.int64)
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0).expand(batch, -1)
    world = dist.get_world_size(group)
    if world == 1:
        return doc_ids
    parts = [torch.empty_like(doc_ids) for _ in range(world)]
    all_gather(parts, doc_ids.contiguous(), group)
    return torch.cat(parts, dim=1)


def check_ulysses_inputs(q, k, v, world: int, layout: str, doc_ids=None) -> None:
    check_attention_inputs(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise SeqparError(f"q and k/v shards must have the same length; got {q.shape[1]} and {k.shape[1]}.")
    check_layout(q.shape[1] * world, world, layout)
    kv_replication(q.shape[2], k.shape[2], world)
    if doc_ids is not None and tuple(doc_ids.shape) not in {(q.shape[1],), (q.shape[0], q.shape[1])}:
        raise SeqparError(
            f"doc_ids must be this rank's shard, shaped [seq] or [batch, seq] = "
            f"[{q.shape[0]}, {q.shape[1]}]; got {tuple(doc_ids.shape)}.")


def ulysses_attention(q, k, v, group=None, *, causal: bool = True, layout: str = "zigzag",
                      softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None):
    """Exact attention for this rank's sequence shard via two all-to-alls.

    Same contract as `ring_attention`: q [b, s_local, hq, d], k/v [b, s_local, hk, d]
    sharded by `layout` over `group`; returns this rank's output shard.
    """
    world = dist.get_world_size(group)
    check_ulysses_inputs(q, k, v, world, layout, doc_ids)
    seq_len = q.shape[1] * world
    agree_on_kernels(q, group)
    q_h, k_h, v_h = heads_to_ranks(q, k, v, group)
    docs = gather_doc_ids(doc_ids, q.shape[0], group)
    # After the all-to-all, tokens sit in rank order. Putting them back in sequence order
    # makes the causal mask the plain diagonal, which the library kernels serve.
    order = sequence_order(seq_len, world, layout, q.device)
    if order is not None:
        q_h, k_h, v_h = (t.index_select(1, order) for t in (q_h, k_h, v_h))
        docs = None if docs is None else docs.index_select(1, order)
    out_h, _ = attention(q_h, k_h, v_h, causal=causal, softmax_scale=softmax_scale, doc_ids=docs)
    if order is not None:
        out_h = out_h.index_select(1, torch.argsort(order))
    return heads_to_seq(out_h, group)


def sequence_order(seq_len: int, world: int, layout: str, device=None):
    """Permutation from rank order (after the all-to-all) to sequence order; None if equal."""
    positions = torch.cat([shard_positions(seq_len, r, world, layout) for r in range(world)])
    if torch.equal(positions, torch.arange(seq_len)):
        return None
    return torch.argsort(positions).to(device)
