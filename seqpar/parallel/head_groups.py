"""Attention in groups of heads: which heads a group holds, and which numbers of groups fit.

Heads never interact in attention, so a decoder layer can run its attention one group of
query heads at a time (with the K/V heads they read): only that group's q, k, v, output
and their gradients exist at full shard length (`seqpar.model.tiled_layer`). A group is
either whole K/V heads with all their query heads, or part of one K/V head's query heads
(that K/V head is then projected and sent around the ring once per group).

Query head i reads K/V head i // (heads // kv_heads), as transformers' `repeat_kv` lays
them out, so a group's heads are contiguous rows of q_proj and of k_proj/v_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SeqparError
from .ulysses import kv_replication


@dataclass(frozen=True)
class HeadGroup:
    index: int
    q_heads: range  # query heads of this group
    kv_heads: range  # the K/V heads they read


def check_head_groups(heads: int, kv_heads: int, groups: int, ulysses: int = 1) -> None:
    """Raise SeqparError naming the fix unless `groups` groups of heads are possible."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise SeqparError(f"head groups must be an integer >= 1, got {groups!r}.")
    if heads % groups or (groups % kv_heads and kv_heads % groups):
        valid = [n for n in range(1, heads + 1) if heads % n == 0 and (n % kv_heads == 0 or kv_heads % n == 0)]
        raise SeqparError(f"{groups} head groups do not split this model's {heads} query / {kv_heads} "
                          f"key-value heads into whole groups; choose one of {valid}.")
    try:
        kv_replication(heads // groups, max(kv_heads // groups, 1), ulysses)
    except SeqparError as err:
        raise SeqparError(f"{groups} head groups of {heads // groups} query heads do not fit the Ulysses "
                          f"size {ulysses}: {err} Use fewer head groups.") from None


def head_groups(heads: int, kv_heads: int, groups: int) -> list[HeadGroup]:
    """The `groups` groups (checked by `check_head_groups`), in head order."""
    q_per = heads // groups
    out = []
    for i in range(groups):
        if groups <= kv_heads:
            kv_per = kv_heads // groups
            kv = range(i * kv_per, (i + 1) * kv_per)
        else:  # part of one K/V head's query heads
            j = i // (groups // kv_heads)
            kv = range(j, j + 1)
        out.append(HeadGroup(i, range(i * q_per, (i + 1) * q_per), kv))
    return out
