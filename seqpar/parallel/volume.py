"""Communication each algorithm must issue, from its definition (bytes sent per rank).

Used by tests (the counted traffic must equal this, so a change that adds communication
fails) and by `seqpar bench attention` (measured vs theoretical).
Sizes: b batch, seq_len total tokens, hq/hk heads, d head_dim, elem bytes per element
of the inputs; dK/dV travel the ring in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

# Ring attention runs over K/V heads in passes so that one pass's float32 dq accumulator
# stays under this (each pass holds its own accumulators and ring buffers, 1/passes of
# all heads'); shorter shards make one pass. 256 MiB keeps every message tens of MiB.
RING_PASS_BYTES = 256 << 20


@dataclass(frozen=True)
class CommVolume:
    """Calls and bytes one rank sends, by op, for one forward or one backward."""

    calls: dict
    bytes_sent: dict

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


def auto_kv_heads_per_pass(batch: int, s_local: int, q_heads: int, kv_heads: int, head_dim: int,
                      limit: int = RING_PASS_BYTES) -> int:
    """K/V heads one ring pass covers: the most (a divisor of kv_heads, at least one)
    whose query heads' float32 dq fits in `limit` bytes."""
    per_kv_head = 4 * batch * s_local * (q_heads // kv_heads) * head_dim
    fitting = [c for c in range(1, kv_heads + 1) if kv_heads % c == 0 and c * per_kv_head <= limit]
    return max(fitting, default=1)


def _ring(world, b, s_local, hk, d, elem, grad_elem, passes=1):
    kv = 2 * b * s_local * hk * d * elem
    dkv = 2 * b * s_local * hk * d * grad_elem
    if world == 1:
        return CommVolume({}, {}), CommVolume({}, {})
    fwd = CommVolume({"p2p": passes * (world - 1)}, {"p2p": (world - 1) * kv})
    bwd = CommVolume({"p2p": passes * ((world - 1) + world)}, {"p2p": (world - 1) * kv + world * dkv})
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
                  docs: bool = False, kv_heads_per_pass: int | None = None) -> tuple[CommVolume, CommVolume]:
    """(forward, backward) traffic of one attention call on one rank. The ring goes
    around once per group of `kv_heads_per_pass` K/V heads (None: as `ring_attention`
    decides): the same bytes in more messages."""
    grad_elem = 8 if elem_bytes == 8 else 4
    if algo == "ring":
        ulysses_size = 1
    elif algo == "ulysses":
        ulysses_size = sp_size
    ring_size = sp_size // ulysses_size
    s_local = seq_len // sp_size
    fwd_u, bwd_u = _ulysses(ulysses_size, batch, s_local, q_heads, kv_heads, head_dim, elem_bytes)
    copies = 1 if kv_heads % ulysses_size == 0 else ulysses_size // kv_heads
    ring_kv_heads = kv_heads * copies // ulysses_size
    per_pass = kv_heads_per_pass or auto_kv_heads_per_pass(
        batch, s_local * ulysses_size, q_heads // ulysses_size, ring_kv_heads, head_dim)
    fwd_r, bwd_r = _ring(ring_size, batch, s_local * ulysses_size, ring_kv_heads,
                         head_dim, elem_bytes, grad_elem, ring_kv_heads // per_pass)
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
