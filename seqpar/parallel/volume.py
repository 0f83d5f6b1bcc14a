"""Communication each algorithm must issue, from its definition (bytes sent per rank).

Used by tests (the counted traffic must equal this, so a change that adds communication
fails) and by `seqpar bench attention` (measured vs theoretical).
Sizes: b batch, seq_len total tokens, hq/hk heads, d head_dim, elem bytes per element
of the inputs; dK/dV travel the ring in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommVolume:
    """Calls and bytes one rank sends, by op, for one forward or one backward."""

    calls: dict
    bytes_sent: dict

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


def _ring(world, b, s_local, hk, d, elem, grad_elem):
    kv = 2 * b * s_local * hk * d * elem
    dkv = 2 * b * s_local * hk * d * grad_elem
    if world == 1:
        return CommVolume({}, {}), CommVolume({}, {})
    fwd = CommVolume({"p2p": world - 1}, {"p2p": (world - 1) * kv})
    bwd = CommVolume({"p2p": (world - 1) + world}, {"p2p": (world - 1) * kv + world * dkv})
    return fwd, bwd


def _ulysses(world, b, s_local, hq, hk, d, elem):
    if world == 1:
        return CommVolume({}, {}), CommVolume({}, {})
    copies = 1 if hk % world == 0 else world // hk
    tensors = b * s_local * d * elem * (hq + 2 * hk * copies + hq)  # q, kv, out (or dout, dq, dkv)
    vol = CommVolume({"all_to_all": 3}, {"all_to_all": tensors * (world - 1) // world})
    return vol, vol


def _doc_gather(world, b, s_local):
    return b * s_local * 8 * (world - 1)


def expected_comm(algo: str, *, seq_len: int, batch: int, q_heads: int, kv_heads: int,
                  head_dim: int, elem_bytes: int, sp_size: int, ulysses_size: int = 1,
                  docs: bool = False) -> tuple[CommVolume, CommVolume]:
    """(forward, backward) traffic of one attention call on one rank."""
    grad_elem = 8 if elem_bytes == 8 else 4
    if algo == "ring":
        ulysses_size = 1
    elif algo == "ulysses":
        ulysses_size = sp_size
    ring_size = sp_size // ulysses_size
    s_local = seq_len // sp_size
    fwd_u, bwd_u = _ulysses(ulysses_size, batch, s_local, q_heads, kv_heads, head_dim, elem_bytes)
    copies = 1 if kv_heads % ulysses_size == 0 else ulysses_size // kv_heads
    fwd_r, bwd_r = _ring(ring_size, batch, s_local * ulysses_size, kv_heads * copies // ulysses_size,
                         head_dim, elem_bytes, grad_elem)
    fwd = _add(fwd_u, fwd_r)
    if docs:  # document ids are gathered once per forward in each group that needs them
        if ulysses_size > 1:
            fwd = _add(fwd, _gather(_doc_gather(ulysses_size, batch, s_local)))
        if ring_size > 1:
            fwd = _add(fwd, _gather(_doc_gather(ring_size, batch, s_local * ulysses_size)))
    return fwd, _add(bwd_u, bwd_r)


def _gather(nbytes: int) -> CommVolume:
    return CommVolume({"all_gather": 1}, {"all_gather": nbytes})


def _add(a: CommVolume, b: CommVolume) -> CommVolume:
    calls = {k: a.calls.get(k, 0) + b.calls.get(k, 0) for k in a.calls | b.calls}
    sent = {k: a.bytes_sent.get(k, 0) + b.bytes_sent.get(k, 0) for k in a.bytes_sent | b.bytes_sent}
    return CommVolume(calls, sent)
