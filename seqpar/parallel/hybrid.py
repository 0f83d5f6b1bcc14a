"""Hybrid (USP / 2D) attention: Ulysses inside, ring across.

The sequence is sharded over all sp_size = ulysses_size x ring_size ranks. An all-to-all
inside each Ulysses group turns U sequence shards into one longer shard with H/U heads;
those longer shards are exactly a `layout` sharding over the ring group (after a
reordering of whole chunks for zigzag), so ring attention runs across Ulysses groups
unchanged, and a second all-to-all hands heads back.
"""

from __future__ import annotations

import torch

from ..errors import SeqparError
from .kernels import agree_on_kernels
from .layout import check_shard_inputs, shard_positions
from .ring import ring_attention
from .ulysses import attend_over_heads, kv_replication


def ring_order(seq_len: int, mesh, layout: str, device=None) -> torch.Tensor | None:
    """Permutation from Ulysses-gathered token order to the ring layout's order (None if
    they already agree)."""
    U, ring_rank = mesh.ulysses_size, mesh.ring_rank
    gathered = torch.cat([shard_positions(seq_len, ring_rank * U + u, mesh.sp_size, layout)
                          for u in range(U)])
    wanted = shard_positions(seq_len, ring_rank, mesh.ring_size, layout)
    perm = torch.argsort(gathered)
    if not torch.equal(gathered[perm], wanted):
        raise SeqparError(
            f"layout {layout!r} does not compose with ulysses_size={U} x ring_size={mesh.ring_size}; "
            f"use layout='zigzag' or 'contiguous' for hybrid attention.")
    if torch.equal(perm, torch.arange(len(perm))):
        return None
    return perm.to(device)


def hybrid_attention(q, k, v, mesh, *, causal: bool = True, layout: str = "zigzag",
                     softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None):
    """Exact attention for this rank's shard over `mesh.sp_group` (see module doc).

    q [b, s_local, hq, d], k/v [b, s_local, hk, d], sharded by `layout` over the SP group
    (SP rank = ring_rank * ulysses_size + ulysses_rank). Returns this rank's output shard.
    """
    check_shard_inputs(q, k, v, mesh.sp_size, layout, doc_ids)
    seq_len = q.shape[1] * mesh.sp_size
    kv_replication(q.shape[2], k.shape[2], mesh.ulysses_size)
    if layout == "stripe" and mesh.ulysses_size > 1 and mesh.ring_size > 1:
        raise SeqparError("hybrid attention supports layout 'zigzag' or 'contiguous', not 'stripe'.")
    perm = ring_order(seq_len, mesh, layout, q.device)
    agree_on_kernels(q, mesh.sp_group)

    def attend(q_h, k_h, v_h, docs):
        return ring_attention(q_h, k_h, v_h, mesh.ring_group, causal=causal, layout=layout,
                              softmax_scale=softmax_scale, doc_ids=docs)

    return attend_over_heads(q, k, v, mesh.ulysses_group, doc_ids, perm, attend)
