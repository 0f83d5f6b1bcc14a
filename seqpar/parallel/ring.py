"""Ring attention: exact attention over a sequence sharded across the ranks of a group.

The algorithm (W ranks, rank r):

    out, lse = 0, -inf
    for step t = 0 .. W-1:                       K/V in hand: rank src = (r - t) mod W's
        start sending this K/V block to r+1, receiving the next one from r-1
        for each kernel call planned for (my queries, src's keys):
            (o, l) = attention_forward(those query rows, those key rows)
            merge (o, l) into (out, lse) by log-sum-exp, in float32
        wait: the block from r-1 is the next step's K/V

Backward runs the same ring again. dq accumulates locally; a float32 dK/dV buffer
travels with the K/V block it belongs to, each rank adds its contribution, and one last
hop brings it home. No rank ever holds more than one remote K/V block. Both passes use
the same `RingExchange` (comm.py) through `_ring_steps`.

Long shards go around the ring in passes over groups of K/V heads (with the query
heads that share them): heads never interact, and each pass holds float32 accumulators
and ring buffers for its heads only, so a rank's extra memory is 1/passes of one pass
over all heads (`volume.auto_kv_heads_per_pass`: a pass's float32 dq at most 256 MiB).

What travels always has one shape and dtype on every rank (K and V stacked in the input
dtype; dK/dV stacked in float32), even when a rank skipped its block: gloo pairs
messages blindly. Every rank issues the same exchanges in the same order.

Which blocks are computed (`plan_blocks`). A shard is one or two runs of global tokens
(`layout.Chunk`). Under a causal mask each (query run, key run) pair is
- skipped when every key is in the future of every query,
- computed in full (no mask) when every key is in the past,
- masked by global positions when the causal diagonal cuts through it.
A query run that skips nothing makes one call over all keys in hand; when every query
sees every key, one unmasked call covers the whole block.

Worked example: zigzag, W = 2, 8 tokens, so 4 chunks of 2 tokens. Rank 0 holds chunks
0 and 3 (tokens 0-1 and 6-7); rank 1 holds chunks 1 and 2 (tokens 2-3 and 4-5).
What rank 1 computes (its local rows 0-1 are tokens 2-3, rows 2-3 are tokens 4-5):

    step 0, its own K/V (rank 1: tokens 2-3, 4-5)
      queries 2-3 x keys 2-3   masked  (the diagonal)
      queries 2-3 x keys 4-5   skipped (all in the future)
      queries 4-5 x keys 2-5   masked  (one call: 2-3 are in the past, 4-5 the diagonal)
    step 1, rank 0's K/V (tokens 0-1, 6-7)
      queries 2-3 x keys 0-1   full    (all in the past)
      queries 4-5 x keys 0-1   full
      queries 2-5 x keys 6-7   skipped (all in the future)

At step 1 rank 0 (tokens 0-1, 6-7 against keys 2-5) computes queries 6-7 x keys 2-5 in
full and skips queries 0-1: both ranks compute 8 of the 16 scores, which is why zigzag
balances causal work. `plan_blocks` returns exactly this (checked by tests):

    >>> from seqpar.parallel.layout import shard_chunks
    >>> rank0, rank1 = shard_chunks(8, 0, 2), shard_chunks(8, 1, 2)
    >>> for call in plan_blocks(rank1, rank1, causal=True): print(call)
    queries 2-3 x keys 2-3: causal
    queries 4-5 x keys 2-3+4-5: causal
    >>> for call in plan_blocks(rank1, rank0, causal=True): print(call)
    queries 2-3 x keys 0-1: full
    queries 4-5 x keys 0-1: full
    >>> for call in plan_blocks(rank0, rank1, causal=True): print(call)
    queries 6-7 x keys 2-3+4-5: full
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..ops import attention, attention_backward, attention_delta, attention_forward
from ..ops.dtypes import accumulate_dtype
from ..ops.masks import classify_mask
from .comm import TAG_DKV, TAG_KV, RingExchange
from .kernels import agree_on_kernels
from .layout import Chunk, check_shard_inputs, doc_ids_by_rank, shard_chunks
from .volume import auto_kv_heads_per_pass

FULL, CAUSAL = "full", "causal"  # BlockCall.mask: every query sees every key / mask by positions


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Rows:
    """Consecutive local rows of a shard, as the runs of global tokens they hold."""

    runs: tuple[Chunk, ...]

    @property
    def rows(self) -> slice:
        return slice(self.runs[0].start, self.runs[-1].stop)

    def positions(self, device=None) -> torch.Tensor:
        return torch.cat([c.positions(device) for c in self.runs])

    def __len__(self) -> int:
        return self.runs[-1].stop - self.runs[0].start

    def __str__(self) -> str:
        return "+".join(f"{c.first}-{c.last}" if c.step == 1 else f"{c.first}-{c.last}/{c.step}"
                        for c in self.runs)


@dataclass(frozen=True)
class BlockCall:
    """One local kernel call: query rows `q_rows` against key rows `k_rows` of the K/V
    block in hand; `mask` is FULL (no mask) or CAUSAL (masked by global positions)."""

    q_rows: Rows
    k_rows: Rows
    mask: str

    @property
    def masked(self) -> bool:
        return self.mask == CAUSAL

    def __str__(self) -> str:
        return f"queries {self.q_rows} x keys {self.k_rows}: {self.mask}"


def _pair_kind(qc: Chunk, kc: Chunk, causal: bool) -> str:
    if not causal:
        return FULL
    if kc.first > qc.last:
        return "skip"
    if kc.last <= qc.first:
        return FULL
    return CAUSAL


def _docs_disjoint(q_doc, k_doc, qc: Chunk, kc: Chunk) -> bool:
    if q_doc is None:
        return False
    qd, kd = q_doc[:, qc.start:qc.stop], k_doc[:, kc.start:kc.stop]
    return bool(((kd.amax(1) < qd.amin(1)) | (kd.amin(1) > qd.amax(1))).all())


def plan_blocks(q_chunks, k_chunks, causal: bool, q_doc=None, k_doc=None) -> list[BlockCall]:
    """Kernel calls needed for one (local queries, K/V block) pair, fewest first (see the
    module doc). `q_doc`/`k_doc` ([b, s_local]) also skip pairs sharing no document."""
    all_keys = Rows(tuple(k_chunks))
    calls = []
    for qc in q_chunks:
        kinds = ["skip" if _docs_disjoint(q_doc, k_doc, qc, kc) else _pair_kind(qc, kc, causal)
                 for kc in k_chunks]
        if "skip" not in kinds:  # one call over all keys
            calls.append(BlockCall(Rows((qc,)), all_keys, CAUSAL if CAUSAL in kinds else FULL))
        else:
            calls += [BlockCall(Rows((qc,)), Rows((kc,)), kind)
                      for kc, kind in zip(k_chunks, kinds) if kind != "skip"]
    whole = len(calls) == len(q_chunks) and all(c.k_rows == all_keys and not c.masked for c in calls)
    if whole and len(calls) > 1:  # every query sees every key: one unmasked call
        return [BlockCall(Rows(tuple(q_chunks)), all_keys, FULL)]
    return calls


@dataclass(frozen=True)
class _Kernel:
    """A BlockCall made concrete: row slices and the keywords of attention_forward/backward."""

    q: slice
    k: slice
    mask: dict


def _kernel(call: BlockCall, softmax_scale, device, docs) -> _Kernel:
    """`docs`: (this rank's doc ids, the K/V owner's) [b, s_local], or None."""
    q_rows, k_rows = call.q_rows.rows, call.k_rows.rows
    mask = dict(causal=call.masked, softmax_scale=softmax_scale)
    if call.masked:
        mask.update(q_positions=call.q_rows.positions(device), k_positions=call.k_rows.positions(device))
    if docs is not None:
        mask["doc_ids"] = (docs[0][:, q_rows], docs[1][:, k_rows])
    # Classified on host-side positions (the chunks), so no device sync per block.
    host = (call.q_rows.positions(), call.k_rows.positions()) if call.masked else (None, None)
    mask["mask_kind"] = classify_mask(len(call.q_rows), len(call.k_rows), causal=call.masked,
                                      q_positions=host[0], k_positions=host[1], doc_ids=mask.get("doc_ids"))
    return _Kernel(q_rows, k_rows, mask)


def _plan_kernels(q, group, causal, layout, softmax_scale, doc_ids) -> list[list[_Kernel]]:
    """For each source rank, the kernel calls of (this rank's queries, its K/V block)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    chunks = [shard_chunks(q.shape[1] * world, r, world, layout) for r in range(world)]
    docs = doc_ids_by_rank(doc_ids, q.shape[0], group, q.device)
    kernels = []
    for src in range(world):
        pair = None if docs is None else (docs[rank], docs[src])
        calls = plan_blocks(chunks[rank], chunks[src], causal, *(pair or (None, None)))
        kernels.append([_kernel(c, softmax_scale, q.device, pair) for c in calls])
    return kernels


# ---------------------------------------------------------------- the ring

def _ring_steps(kv: torch.Tensor, group):
    """Yield (src, K/V block of rank src) for the W steps of the ring, starting with this
    rank's own block. While the caller works on one block the next is travelling."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ring = RingExchange(group, TAG_KV)
    for step in range(world):
        last = step == world - 1
        if not last:
            ring.start(kv)
        yield (rank - step) % world, kv
        if not last:
            kv = ring.finish()


def _merge(out_acc, lse_acc, out_blk, lse_blk) -> None:
    """In-place log-sum-exp merge of a block result into the running (out, lse)."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    new_max = torch.maximum(lse_acc, lse_blk)
    new_max = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
    w_acc = torch.exp(lse_acc - new_max)
    w_blk = torch.exp(lse_blk - new_max)
    total = w_acc + w_blk
    safe = torch.where(total == 0, torch.ones_like(total), total)
    out_acc.mul_((w_acc / safe).transpose(1, 2).unsqueeze(-1))
    out_acc.add_(out_blk.to(out_acc.dtype) * (w_blk / safe).transpose(1, 2).unsqueeze(-1))
    lse_acc.copy_(new_max + torch.log(total))  # -inf where neither saw a key


def _passes(q, k, kv_per_pass: int):
    """(query heads, K/V heads) of each pass: K/V heads in runs of `kv_per_pass`, with the
    query heads that share them (consecutive: GQA's repeat_interleave order)."""
    g = q.shape[2] // k.shape[2]
    return [(slice(i * g, (i + kv_per_pass) * g), slice(i, i + kv_per_pass))
            for i in range(0, k.shape[2], kv_per_pass)]


def _heads(t: torch.Tensor, heads: slice) -> torch.Tensor:
    """Some heads of a bshd tensor, contiguous so the kernels see the layout they are
    self-tested on; all of them: the tensor itself, as it came (one pass copies nothing)."""
    if heads.stop - heads.start == t.shape[2]:
        return t
    return t[:, :, heads].contiguous()


def _forward_pass(q, k, v, kernels, group):
    """(out, lse) of these heads: the ring once around, blocks merged in float32."""
    acc = accumulate_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
    for src, kv in _ring_steps(torch.stack([k, v]), group):
        for call in kernels[src]:
            out_blk, lse_blk = attention_forward(q[:, call.q], kv[0][:, call.k], kv[1][:, call.k], **call.mask)
            _merge(out_acc[:, call.q], lse_acc[:, :, call.q], out_blk, lse_blk)
    return out_acc.to(q.dtype), lse_acc


def _backward_pass(dout, q, k, v, out, lse, delta, kernels, group):
    """(dq, dk, dv) of these heads: the ring once around again, dq summed here in float32,
    a float32 dK/dV buffer travelling with its K/V block and coming home at the end."""
    acc = accumulate_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_ring = RingExchange(group, TAG_DKV)
    for step, (src, kv) in enumerate(_ring_steps(torch.stack([k, v]), group)):
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for call in kernels[src]:
            qr, kr = call.q, call.k
            attention_backward(dout[:, qr], q[:, qr], kv[0][:, kr], kv[1][:, kr], out[:, qr], lse[:, :, qr],
                               delta=delta[:, :, qr], into=(dq[:, qr], dkv[0][:, kr], dkv[1][:, kr]),
                               **call.mask)
        # The dK/dV buffer of block `src` arrived from rank r-1 while we computed; add
        # ours and pass it on. After the last step it lands on its owner.
        if step > 0:
            dkv += dkv_ring.finish()
        dkv_ring.start(dkv)
    dkv = dkv_ring.finish()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, softmax_scale, doc_ids, kv_per_pass):
        kernels = _plan_kernels(q, group, causal, layout, softmax_scale, doc_ids)
        passes = _passes(q, k, kv_per_pass)
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=accumulate_dtype(q.dtype), device=q.device)
        for qh, kh in passes:
            out[:, :, qh], lse[:, qh] = _forward_pass(_heads(q, qh), _heads(k, kh), _heads(v, kh), kernels, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.kernels, ctx.passes = group, kernels, passes
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        delta = attention_delta(dout, out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for qh, kh in ctx.passes:
            dq[:, :, qh], dk[:, :, kh], dv[:, :, kh] = _backward_pass(
                _heads(dout, qh), _heads(q, qh), _heads(k, kh), _heads(v, kh), _heads(out, qh), lse[:, qh],
                delta[:, qh], ctx.kernels, ctx.group)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(q, k, v, group=None, *, causal: bool = True, layout: str = "zigzag",
                   softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None,
                   return_lse: bool = False, kv_heads_per_pass: int | None = None):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    q [b, s_local, hq, d], k/v [b, s_local, hk, d]: this rank's shard of the sequence
    under `layout` over `group` (see `seqpar.parallel.shard`). `doc_ids` ([s_local] or
    [b, s_local], this rank's shard) restricts attention to tokens of the same packed
    document. Returns this rank's output shard (and lse [b, hq, s_local] if asked);
    forward and backward equal single-device attention on the unsharded tensors.
    The ring goes around once per group of `kv_heads_per_pass` K/V heads (default: as
    many as keep a pass's float32 dq under `volume.RING_PASS_BYTES`), so its float32
    accumulators and buffers hold only that group's heads.
    """
    world = dist.get_world_size(group)
    check_shard_inputs(q, k, v, world, layout, doc_ids)
    if kv_heads_per_pass is not None and (kv_heads_per_pass < 1 or k.shape[2] % kv_heads_per_pass):
        # Checked before any communication, on every rank alike (same shapes everywhere).
        raise SeqparError(f"kv_heads_per_pass={kv_heads_per_pass} must divide the {k.shape[2]} K/V heads.")
    if world == 1:
        # Alone in its group a rank holds the whole sequence in order (every layout is the
        # identity for one rank): one block, with no float32 accumulators and no split
        # diagonal, which is where a one-GPU run's memory peaks.
        out, lse = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, doc_ids=doc_ids)
        return (out, lse) if return_lse else out
    agree_on_kernels(q, group)
    b, s_local, hq, d = q.shape
    per_pass = kv_heads_per_pass or auto_kv_heads_per_pass(b, s_local, hq, k.shape[2], d)
    out, lse = _RingAttention.apply(q, k, v, group, causal, layout, softmax_scale, doc_ids, per_pass)
    return (out, lse) if return_lse else out
