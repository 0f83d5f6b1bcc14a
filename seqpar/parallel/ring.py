"""Ring attention: exact attention over a sequence sharded across the ranks of a group.

Forward: W steps. At step t rank r holds the K/V block of rank src = r - t, computes its
queries against it with `seqpar.ops.attention_forward` and merges (out, lse) in float32
by log-sum-exp, while the next K/V block is already travelling (send to r+1, receive
from r-1). Backward: the same ring again; dq accumulates locally, while a float32 dK/dV
buffer travels with the K/V it belongs to, picking up every rank's contribution, and
one last hop brings it home. No rank ever holds more than one remote K/V block.

What travels always has one shape and dtype on every rank (K and V stacked in the input
dtype; dK/dV stacked in float32), even when a rank skipped its block: gloo pairs
messages blindly. Every rank issues the same exchanges in the same order.

Causal blocks are planned from the layout's global positions: a (query run, key run)
pair that is entirely in the future is skipped, one entirely in the past needs no mask,
and only the pairs that straddle the diagonal are masked by positions. With `zigzag`
every rank does the same causal work at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..ops import attention_backward, attention_delta, attention_forward
from ..ops.masks import check_attention_inputs, classify_mask
from ..ops.reference import accumulate_dtype
from .comm import TAG_DKV, TAG_KV, all_gather, ring_exchange, wait_all
from .kernels import agree_on_kernels
from .layout import Chunk, check_layout, shard_chunks


@dataclass(frozen=True)
class BlockTask:
    """One local kernel call: query rows [q_start, q_stop) against key rows [k_start, k_stop)
    of the current K/V block; `masked` when the causal mask cuts through it."""

    q: Chunk
    k: Chunk
    masked: bool


def _pair_kind(qc: Chunk, kc: Chunk, causal: bool) -> str:
    if not causal:
        return "full"
    if kc.first > qc.last:
        return "skip"
    if kc.last <= qc.first:
        return "full"
    return "masked"


def _docs_disjoint(q_doc, k_doc, qc: Chunk, kc: Chunk) -> bool:
    if q_doc is None:
        return False
    qd, kd = q_doc[:, qc.start:qc.stop], k_doc[:, kc.start:kc.stop]
    return bool(((kd.amax(1) < qd.amin(1)) | (kd.amin(1) > qd.amax(1))).all())


def plan_blocks(q_chunks, k_chunks, causal: bool, q_doc=None, k_doc=None) -> list[BlockTask]:
    """Kernel calls needed for one (local queries, remote keys) block, fewest first."""
    per_q = []
    for qc in q_chunks:
        kinds = ["skip" if _docs_disjoint(q_doc, k_doc, qc, kc) else _pair_kind(qc, kc, causal)
                 for kc in k_chunks]
        if "skip" not in kinds:  # one call over all keys
            per_q.append([(qc, None, "masked" in kinds)])
        else:
            per_q.append([(qc, kc, kind == "masked") for kc, kind in zip(k_chunks, kinds) if kind != "skip"])
    if all(t == [(qc, None, False)] for t, qc in zip(per_q, q_chunks)):
        return [BlockTask(None, None, False)]  # every query sees every key: one unmasked call
    return [BlockTask(qc, kc, masked) for tasks in per_q for qc, kc, masked in tasks]


def _rows(chunk: Chunk | None, chunks: list[Chunk], device):
    """(row slice, global positions) of a task side; None means the whole shard."""
    if chunk is None:
        return slice(chunks[0].start, chunks[-1].stop), torch.cat([c.positions(device) for c in chunks])
    return slice(chunk.start, chunk.stop), chunk.positions(device)


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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, softmax_scale, doc_ids):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        s_local = q.shape[1]
        seq_len = s_local * world
        chunks = [shard_chunks(seq_len, r, world, layout) for r in range(world)]
        all_docs = _gather_doc_ids(doc_ids, q, group, world)
        plans = [plan_blocks(chunks[rank], chunks[src], causal,
                             None if all_docs is None else all_docs[rank],
                             None if all_docs is None else all_docs[src]) for src in range(world)]

        acc = accumulate_dtype(q.dtype)
        out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full((q.shape[0], q.shape[2], s_local), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        for step in range(world):
            src = (rank - step) % world
            if step < world - 1:
                kv_next = torch.empty_like(kv)
                reqs = ring_exchange(kv, kv_next, group, TAG_KV)
            for task, kw in _task_args(plans[src], chunks[rank], chunks[src], causal, softmax_scale,
                                        all_docs, rank, src, q.device):
                out_blk, lse_blk = attention_forward(q[:, kw["q_rows"]], kv[0][:, kw["k_rows"]],
                                                     kv[1][:, kw["k_rows"]], **kw["mask"])
                _merge(out_acc[:, kw["q_rows"]], lse_acc[:, :, kw["q_rows"]], out_blk, lse_blk)
            if step < world - 1:
                wait_all(reqs)
                kv = kv_next

        out = out_acc.to(q.dtype)
        lse = lse_acc.float() if q.dtype != torch.float64 else lse_acc
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (group, causal, softmax_scale, chunks, plans, all_docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, softmax_scale, chunks, plans, all_docs = ctx.meta
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        acc = accumulate_dtype(q.dtype)
        delta = attention_delta(dout, out)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = dkv_reqs = dkv_in = None
        for step in range(world):
            src = (rank - step) % world
            if step < world - 1:
                kv_next = torch.empty_like(kv)
                kv_reqs = ring_exchange(kv, kv_next, group, TAG_KV)
            block_dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
            for task, kw in _task_args(plans[src], chunks[rank], chunks[src], causal, softmax_scale,
                                        all_docs, rank, src, q.device):
                qr, kr = kw["q_rows"], kw["k_rows"]
                dq_blk, dk_blk, dv_blk = attention_backward(
                    dout[:, qr], q[:, qr], kv[0][:, kr], kv[1][:, kr], out[:, qr], lse[:, :, qr],
                    delta=delta[:, :, qr], **kw["mask"])
                dq[:, qr] += dq_blk
                block_dkv[0][:, kr] += dk_blk
                block_dkv[1][:, kr] += dv_blk
            # The dK/dV buffer for `src` arrived from rank r-1 while we computed; add ours
            # and pass it on. After the last step it lands on its owner.
            if dkv_reqs is not None:
                wait_all(dkv_reqs)
                block_dkv += dkv_in
            dkv = block_dkv
            if world == 1:
                dkv_in = dkv  # nothing travels: our own block is the whole sequence
                continue
            dkv_in = torch.empty_like(dkv)
            dkv_reqs = ring_exchange(dkv, dkv_in, group, TAG_DKV)
            if step < world - 1:
                wait_all(kv_reqs)
                kv = kv_next
        wait_all(dkv_reqs)
        return (dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype),
                None, None, None, None, None)


def _task_args(tasks, q_chunks, k_chunks, causal, softmax_scale, all_docs, rank, src, device):
    """Slices and mask keywords of each planned kernel call."""
    for task in tasks:
        q_rows, q_pos = _rows(task.q, q_chunks, device)
        k_rows, k_pos = _rows(task.k, k_chunks, device)
        mask = dict(causal=task.masked, softmax_scale=softmax_scale)
        if task.masked:
            mask.update(q_positions=q_pos, k_positions=k_pos)
        if all_docs is not None:
            mask["doc_ids"] = (all_docs[rank][:, q_rows], all_docs[src][:, k_rows])
        # Classified on host-side positions (the chunks), so no device sync per block.
        mask["mask_kind"] = classify_mask(
            q_pos.numel(), k_pos.numel(), causal=task.masked,
            q_positions=_rows(task.q, q_chunks, "cpu")[1] if task.masked else None,
            k_positions=_rows(task.k, k_chunks, "cpu")[1] if task.masked else None,
            doc_ids=mask.get("doc_ids"))
        yield task, dict(q_rows=q_rows, k_rows=k_rows, mask=mask)


def _gather_doc_ids(doc_ids, q, group, world):
    """Every rank's document ids ([b, s_local] each), gathered once per call: they are
    tiny, and knowing them lets blocks with no shared document be skipped."""
    if doc_ids is None:
        return None
    doc_ids = doc_ids.to(device=q.device, dtype=torch.int64)
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0).expand(q.shape[0], -1)
    if world == 1:
        return [doc_ids]
    parts = [torch.empty_like(doc_ids) for _ in range(world)]
    all_gather(parts, doc_ids.contiguous(), group)
    return parts


def check_ring_inputs(q, k, v, world: int, layout: str, doc_ids=None) -> None:
    """Shape checks every rank can do alone, before any communication."""
    check_attention_inputs(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise SeqparError(
            f"q and k/v shards must have the same length; got {q.shape[1]} and {k.shape[1]}.")
    check_layout(q.shape[1] * world, world, layout)
    if doc_ids is not None and tuple(doc_ids.shape) not in {(q.shape[1],), (q.shape[0], q.shape[1])}:
        raise SeqparError(
            f"doc_ids must be this rank's shard, shaped [seq] or [batch, seq] = "
            f"[{q.shape[0]}, {q.shape[1]}]; got {tuple(doc_ids.shape)}.")


def ring_attention(q, k, v, group=None, *, causal: bool = True, layout: str = "zigzag",
                   softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None,
                   return_lse: bool = False):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    q [b, s_local, hq, d], k/v [b, s_local, hk, d]: this rank's shard of the sequence
    under `layout` over `group` (see `seqpar.parallel.shard`). `doc_ids` ([s_local] or
    [b, s_local], this rank's shard) restricts attention to tokens of the same packed
    document. Returns this rank's output shard (and lse [b, hq, s_local] if asked);
    forward and backward equal single-device attention on the unsharded tensors.
    """
    world = dist.get_world_size(group)
    check_ring_inputs(q, k, v, world, layout, doc_ids)
    agree_on_kernels(q, group)
    out, lse = _RingAttention.apply(q, k, v, group, causal, layout, softmax_scale, doc_ids)
    return (out, lse) if return_lse else out
