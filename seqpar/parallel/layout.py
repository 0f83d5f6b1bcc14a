"""How one sequence is cut into per-rank shards, and back.

Layouts (W ranks, sequence length S):
- contiguous: rank r holds tokens [r*S/W, (r+1)*S/W).
- zigzag: the sequence is cut into 2W chunks; rank r holds chunks r and 2W-1-r, so every
  rank has the same amount of causal work (early and late tokens together).
- stripe: rank r holds tokens r, r+W, r+2W, ... (also balanced, but no block is ever
  fully visible or fully masked, so no causal block can be skipped).

A shard's tokens are kept in increasing global order; `shard_positions` gives their
global indices, from which masks (and RoPE) are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..ops.masks import check_attention_inputs
from .comm import gather_shards

LAYOUTS = ("contiguous", "zigzag", "stripe")


def check_layout(seq_len: int, world_size: int, layout: str) -> None:
    """Raise SeqparError unless `seq_len` can be split over `world_size` ranks by `layout`."""
    if layout not in LAYOUTS:
        raise SeqparError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if world_size < 1:
        raise SeqparError(f"world_size must be >= 1, got {world_size}.")
    multiple = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % multiple != 0:
        fix = -(-seq_len // multiple) * multiple
        need = f"2 * world_size = {multiple}" if layout == "zigzag" else f"world_size = {multiple}"
        raise SeqparError(
            f"sequence length {seq_len} is not divisible by {need}, which the {layout} layout "
            f"needs; pad or truncate the sequence to a multiple of {multiple} (e.g. {fix}).")


@dataclass(frozen=True)
class Chunk:
    """A run of a shard's rows: local rows [start, stop) hold global tokens
    first, first+step, ...; step is 1 for a contiguous run."""

    start: int
    stop: int
    first: int
    step: int = 1

    @property
    def last(self) -> int:
        return self.first + (self.stop - self.start - 1) * self.step

    def positions(self, device=None) -> torch.Tensor:
        return torch.arange(self.first, self.last + 1, self.step, device=device)


def shard_chunks(seq_len: int, rank: int, world_size: int, layout: str = "zigzag") -> list[Chunk]:
    """The runs of global tokens a rank holds, in local order."""
    check_layout(seq_len, world_size, layout)
    local = seq_len // world_size
    if layout == "contiguous":
        return [Chunk(0, local, rank * local)]
    if layout == "stripe":
        return [Chunk(0, local, rank, world_size)]
    half = local // 2
    return [Chunk(0, half, rank * half), Chunk(half, local, (2 * world_size - 1 - rank) * half)]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                    device=None) -> torch.Tensor:
    """Global token indices (int64, increasing) held by `rank` under `layout`."""
    return torch.cat([c.positions(device) for c in shard_chunks(seq_len, rank, world_size, layout)])


def _group_rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the full tensor `x` along `dim` (a new contiguous tensor)."""
    rank, world = _group_rank_size(group)
    chunks = shard_chunks(x.shape[dim], rank, world, layout)
    if all(c.step == 1 for c in chunks):
        return torch.cat([x.narrow(dim, c.first, c.stop - c.start) for c in chunks], dim=dim)
    return x.index_select(dim, shard_positions(x.shape[dim], rank, world, layout, x.device))


def unshard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """All-gather every rank's shard along `dim` and put tokens back in global order."""
    rank, world = _group_rank_size(group)
    seq_len = x.shape[dim] * world
    check_layout(seq_len, world, layout)
    parts = gather_shards(x.contiguous(), group)
    full_shape = list(x.shape)
    full_shape[dim] = seq_len
    full = x.new_empty(full_shape)
    for r, part in enumerate(parts):
        full.index_copy_(dim, shard_positions(seq_len, r, world, layout, x.device), part)
    return full


def check_shard_inputs(q, k, v, world: int, layout: str, doc_ids=None) -> None:
    """Checks of one rank's q/k/v (and doc_ids) shards that need no communication."""
    check_attention_inputs(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise SeqparError(
            f"q and k/v shards must have the same length; got {q.shape[1]} and {k.shape[1]}.")
    check_layout(q.shape[1] * world, world, layout)
    if doc_ids is not None and tuple(doc_ids.shape) not in {(q.shape[1],), (q.shape[0], q.shape[1])}:
        raise SeqparError(
            f"doc_ids must be this rank's shard, shaped [seq] or [batch, seq] = "
            f"[{q.shape[0]}, {q.shape[1]}]; got {tuple(doc_ids.shape)}.")


def doc_ids_by_rank(doc_ids, batch: int, group, device=None) -> list[torch.Tensor] | None:
    """Every rank's document ids ([batch, s_local] int64 each), in rank order; None if
    there are none. They are tiny: one all-gather per attention call."""
    if doc_ids is None:
        return None
    doc_ids = doc_ids.to(device=device or doc_ids.device, dtype=torch.int64)
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0).expand(batch, -1)
    return gather_shards(doc_ids.contiguous(), group)
