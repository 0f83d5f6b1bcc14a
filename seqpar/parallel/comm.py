"""Every collective seqpar issues goes through here, so it can be counted.

`count_comm()` records each call and the bytes this rank sends; tests assert the counts
against each algorithm's definition, and `seqpar bench` reports them against theory.
No other module of `seqpar.parallel`, `seqpar.ops` or `seqpar.model.loss` calls a
`torch.distributed` collective or point-to-point op: ring attention uses
`RingExchange`, Ulysses `all_to_all`, layouts and document ids `gather_shards`, the
sharded loss `all_reduce`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Distinct tags keep the K/V stream and the dK/dV stream of ring backward apart on
# backends that match point-to-point messages by (peer, tag), like gloo.
TAG_KV = 0
TAG_DKV = 1


@dataclass
class CommCounter:
    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)

    def add(self, op: str, nbytes: int) -> None:
        self.calls[op] += 1
        self.bytes_sent[op] += int(nbytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


_counters: list[CommCounter] = []


@contextlib.contextmanager
def count_comm():
    """Count the collectives issued inside the block (by this process)."""
    counter = CommCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(op: str, nbytes: int) -> None:
    for counter in _counters:
        counter.add(op, nbytes)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def ring_exchange(send: torch.Tensor, recv: torch.Tensor, group, tag: int = TAG_KV):
    """Start sending `send` to the next rank of `group` and receiving `recv` from the
    previous one; returns the requests to wait on. Shapes and dtypes must match on all
    ranks (gloo pairs messages blindly)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % world, tag=tag),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % world, tag=tag),
    ]
    _record("p2p", nbytes(send))
    return dist.batch_isend_irecv(ops)


def wait_all(requests) -> None:
    for req in requests or ():
        req.wait()


class RingExchange:
    """One stream of equally shaped blocks passed around the ring of `group` (sent to
    rank + 1, received from rank - 1), so a block can travel while another is in use:

        ring.start(block)   # send `block` on; a fresh buffer starts receiving
        ...                 # compute while both messages are in flight
        block = ring.finish()  # wait for both; the block from rank - 1

    With one rank nothing travels and `finish` returns what `start` was given.
    """

    def __init__(self, group, tag: int = TAG_KV):
        self.group, self.tag = group, tag
        self._incoming = self._requests = None

    def start(self, block: torch.Tensor) -> None:
        if dist.get_world_size(self.group) == 1:
            self._incoming = block
            return
        self._incoming = torch.empty_like(block)
        self._requests = ring_exchange(block, self._incoming, self.group, self.tag)

    def finish(self) -> torch.Tensor:
        wait_all(self._requests)
        block, self._incoming, self._requests = self._incoming, None, None
        return block


def all_to_all(output: torch.Tensor, input: torch.Tensor, group) -> None:
    """all_to_all_single over dim 0 (equal splits); counts what leaves this rank."""
    world = dist.get_world_size(group)
    _record("all_to_all", nbytes(input) * (world - 1) // world)
    dist.all_to_all_single(output, input, group=group)


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group) -> None:
    world = dist.get_world_size(group)
    _record("all_gather", nbytes(tensor) * (world - 1))
    dist.all_gather(parts, tensor.contiguous(), group=group)


def gather_shards(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), in rank order; counted."""
    if dist.get_world_size(group) == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    all_gather(parts, tensor, group)
    return parts


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; counts a ring all-reduce's traffic
    (2 (W-1)/W of the tensor leaves each rank). Returns `tensor`."""
    world = dist.get_world_size(group)
    _record("all_reduce", nbytes(tensor) * 2 * (world - 1) // world)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_ranks_true(flags: list[bool], group, device) -> list[bool]:
    """Logical AND of per-rank flags over `group`. Control traffic (kernel self-test
    agreement, once per kernel key and process), so it is not counted by `count_comm`."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1 or not flags:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [bool(x) for x in t.tolist()]
