"""Every rank of a group runs the same local attention kernels.

`agree_on_kernels(q, group)` runs the kernel self-tests for q's device, dtype and
head_dim (first call only) and disables on every rank whatever failed on any rank, so
that a kernel broken on one GPU can never make ranks compute with different kernels.
Ring, Ulysses and hybrid attention call it before their first communication; all ranks
of a group reach it together, since they call the algorithm together.
"""

from __future__ import annotations

from ..ops import registry
from .comm import all_ranks_true


def agree_on_kernels(q, group) -> None:
    device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
    if registry.agreed(device, dtype, head_dim, group_key=id(group)):
        return
    registry.agree_on_kernels(device, dtype, head_dim,
                              lambda flags: all_ranks_true(flags, group, device), group_key=id(group))
