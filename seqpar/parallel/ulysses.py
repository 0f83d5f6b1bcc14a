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
from .comm import all_to_all
from .kernels import agree_on_kernels
from .layout import check_shard_inputs, doc_ids_by_rank, shard_positions


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cut `x` into P pieces along `scatter_dim`, send piece j to rank j, and concatenate
    the pieces received along `gather_dim`, in rank order."""
    send = torch.stack(x.chunk(dist.get_world_size(group), dim=scatter_dim))
    recv = torch.empty_like(send)
    all_to_all(recv, send, group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable `_all_to_all`: its adjoint is the same exchange with the two dims
    swapped (what was scattered is gathered back, and vice versa)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, gather_dim, scatter_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.args), None, None, None


def seq_to_heads(x, group):
    """[b, s, h, d] sequence shard -> [b, P*s, h/P, d] head shard (shards in rank order)."""
    return x if dist.get_world_size(group) == 1 else _AllToAll.apply(x, group, 2, 1)


def heads_to_seq(y, group):
    """Inverse of `seq_to_heads`: [b, P*s, h/P, d] -> [b, s, h, d]."""
    return y if dist.get_world_size(group) == 1 else _AllToAll.apply(y, group, 1, 2)


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
    parts = doc_ids_by_rank(doc_ids, batch, group)
    return None if parts is None else torch.cat(parts, dim=1)


def check_ulysses_inputs(q, k, v, world: int, layout: str, doc_ids=None) -> None:
    check_shard_inputs(q, k, v, world, layout, doc_ids)
    kv_replication(q.shape[2], k.shape[2], world)


def ulysses_attention(q, k, v, group=None, *, causal: bool = True, layout: str = "zigzag",
                      softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None):
    """Exact attention for this rank's sequence shard via two all-to-alls.

    Same contract as `ring_attention`: q [b, s_local, hq, d], k/v [b, s_local, hk, d]
    sharded by `layout` over `group`; returns this rank's output shard.
    """
    world = dist.get_world_size(group)
    check_ulysses_inputs(q, k, v, world, layout, doc_ids)
    agree_on_kernels(q, group)
    # After the all-to-all, tokens sit in rank order. Putting them back in sequence order
    # makes the causal mask the plain diagonal, which the library kernels serve.
    order = sequence_order(q.shape[1] * world, world, layout, q.device)

    def attend(q_h, k_h, v_h, docs):
        return attention(q_h, k_h, v_h, causal=causal, softmax_scale=softmax_scale, doc_ids=docs)[0]

    return attend_over_heads(q, k, v, group, doc_ids, order, attend)


def attend_over_heads(q, k, v, group, doc_ids, order, attend):
    """Ulysses around any attention: trade the sequence shard for a head shard, put the
    gathered tokens in `order` (None: as gathered), run `attend(q, k, v, doc_ids)` on
    them, and trade back. Returns this rank's output shard."""
    q_h, k_h, v_h = heads_to_ranks(q, k, v, group)
    docs = gather_doc_ids(doc_ids, q.shape[0], group)
    if order is not None:
        q_h, k_h, v_h = (t.index_select(1, order) for t in (q_h, k_h, v_h))
        docs = None if docs is None else docs.index_select(1, order)
    out_h = attend(q_h, k_h, v_h, docs)
    if order is not None:
        out_h = out_h.index_select(1, torch.argsort(order))
    return heads_to_seq(out_h, group)


def sequence_order(seq_len: int, world: int, layout: str, device=None):
    """Permutation from rank order (after the all-to-all) to sequence order; None if equal."""
    positions = torch.cat([shard_positions(seq_len, r, world, layout) for r in range(world)])
    if torch.equal(positions, torch.arange(seq_len)):
        return None
    return torch.argsort(positions).to(device)
