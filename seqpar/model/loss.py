"""Causal-LM cross-entropy over a sequence-parallel group, optionally tiled.

    loss = sharded_cross_entropy(hidden, lm_head.weight, labels, mesh.sp_group)

Each SP rank holds a shard of the sequence (any layout: contiguous, zigzag, stripe) and
labels already shifted on the FULL sequence, so every local token carries its own target.
The loss is per-token, so each rank only needs its own tokens; two numbers meet over the
group: the sum of token losses and the count of counted (non-ignored) tokens.

`tiled=True` never builds the [tokens, vocab] logits: `_TiledLinearCE` runs the LM head
and the cross-entropy over chunks of tokens and recomputes each chunk's logits in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import SeqparError
from ..parallel.comm import all_reduce

__all__ = ["default_chunk_size", "sharded_cross_entropy"]

CHUNK_LOGITS_BYTES = 256 << 20  # default budget for one chunk's float32 logits
REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits take at most 256 MiB (the loss
    step's peak is about twice that: a chunk's logits plus one temporary of their size)."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab))


class _AllReduceSum(torch.autograd.Function):
    """Forward: all_reduce(SUM) over `group`. Backward: identity (no communication).

    Why identity: every rank's output is the same global value and every rank
    backpropagates its own copy of it. The true derivative of the global sum with respect
    to this rank's contribution is 1, so passing the incoming gradient through unchanged
    gives each rank exactly d(output)/d(local input). (The adjoint of all_reduce would
    all-reduce the gradients too, which counts every rank's gradient W times once the
    trainer sums parameter gradients over the group.)
    """

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _logits(hidden, weight, bias):
    """The LM head in the inputs' dtype, then float32 (as transformers' ForCausalLMLoss)."""
    return F.linear(hidden, weight, bias).float()


class _TiledLinearCE(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight.T + bias`` without full logits.

    hidden [..., H] (N tokens), weight [V, H], bias [V] or None, labels [N] -> float32
    losses [N]; hidden's gradient is made in hidden's shape (not a view of another shape:
    a tiled final norm writes its own input gradient over it)
    (0 where the label is ignored). Forward keeps only the per-token log-sum-exp; backward
    recomputes each chunk's logits, turns them in place into
    d loss / d logits = g * (softmax - onehot(label)), and accumulates the input gradients
    (weight and bias gradients in float32, cast to their dtype at the end).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, ignore_index):
        flat = hidden.reshape(-1, hidden.shape[-1])
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        n = flat.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)
        loss = torch.empty_like(lse)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                logits = _logits(flat[s:e], weight, bias)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                loss[s:e] = lse[s:e] - logits.gather(1, target[s:e, None]).squeeze(1)
                del logits
        loss.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, target, valid, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = torch.where(valid, grad_loss.float(), 0.0)
        flat = hidden.reshape(-1, hidden.shape[-1])
        n, chunk = flat.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_h = grad_hidden.view(-1, hidden.shape[-1]) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = flat[s:e]
                d = _logits(h, weight, bias).sub_(lse[s:e, None]).exp_()  # softmax
                d.scatter_add_(1, target[s:e, None], d.new_full((e - s, 1), -1.0))
                d.mul_(g[s:e, None])
                if need_b:
                    grad_b += d.sum(0)
                d = d.to(hidden.dtype)
                if need_h:
                    torch.mm(d, weight, out=grad_h[s:e])
                if need_w:
                    if d.dtype == torch.float32:
                        grad_w.addmm_(d.t(), h)
                    else:  # CPU has no low-precision mm into a float32 output
                        grad_w += d.t() @ h
                del d
        return (grad_hidden,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def _check(hidden, weight, labels, bias, chunk_size, reduction):
    if reduction not in REDUCTIONS:
        raise SeqparError(f"reduction={reduction!r} is not supported; choose one of {REDUCTIONS}.")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise SeqparError(f"weight must be [vocab, hidden] with hidden = {hidden.shape[-1]} (the last "
                          f"dim of hidden); got weight {tuple(weight.shape)}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise SeqparError(f"labels {tuple(labels.shape)} must have hidden's shape without its last dim "
                          f"{tuple(hidden.shape[:-1])}: one (already shifted) label per local token.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise SeqparError(f"labels must be integer token ids; got {labels.dtype}.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise SeqparError(f"bias must be [vocab] = ({weight.shape[0]},); got {tuple(bias.shape)}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise SeqparError(f"chunk_size must be a positive int of tokens (or None); got {chunk_size!r}.")


def sharded_cross_entropy(hidden, weight, labels, group=None, *, bias=None, ignore_index=-100,
                          tiled=True, chunk_size=None, reduction="mean"):
    """Causal-LM loss of the UNSHARDED batch, from this SP rank's tokens only.

    hidden [..., H]: this rank's final hidden states (e.g. [b, s_local, H]); weight [V, H]
    and optional bias [V]: the LM head; labels [...]: this rank's labels, shifted on the
    full sequence before sharding (``ignore_index`` = not counted).

    ``reduction="mean"`` returns, identically on every rank of ``group``,
    sum of token losses over all ranks / number of non-ignored tokens over all ranks
    (0, with zero gradients, when no token is counted anywhere). ``"sum"`` returns the
    global sum; ``"none"`` this rank's per-token losses (shape of labels, 0 where ignored;
    nothing is communicated). ``group=None`` or a group of size 1 means purely local
    (NOT the default world group). The loss is float32: logits are computed by the LM head
    in the inputs' dtype (the autocast dtype when autocast is on) and upcast to float32
    before the softmax, as transformers' ``ForCausalLMLoss`` does.

    Gradient contract: the trainer backpropagates each rank's (identical) loss on that
    rank. The sum and count are reduced with an all-reduce whose backward is the
    identity, so the gradient reaching this rank's ``hidden`` is exactly
    d(global loss)/d(local hidden), and this rank's ``weight``/``bias`` gradient is the
    contribution of its own tokens: SUMMING parameter gradients over the SP group gives
    the gradient of the unsharded loss (averaging would give 1/SP of it).

    ``tiled=True`` computes logits and loss in chunks of ``chunk_size`` tokens (default
    `default_chunk_size`: <= 256 MiB of float32 logits per chunk) and recomputes them in
    backward, so the [tokens, V] logits never exist; same numbers as ``tiled=False``.
    """
    _check(hidden, weight, labels, bias, chunk_size, reduction)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    h = hidden.to(dtype)
    w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
    y = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)

    if tiled:
        chunk = chunk_size or default_chunk_size(weight.shape[0])
        per_token = _TiledLinearCE.apply(h, w, b, y, chunk, ignore_index)
    else:
        per_token = F.cross_entropy(_logits(h.reshape(-1, h.shape[-1]), w, b), y, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return per_token.view(labels.shape)

    # [sum of losses, count] in float64: exact counts, one all-reduce for both.
    totals = torch.stack([per_token.double().sum(), (y != ignore_index).sum().double()])
    if group is not None and dist.get_world_size(group) > 1:
        totals = _AllReduceSum.apply(totals, group)
    if reduction == "sum":
        return totals[0].float()
    return (totals[0] / totals[1].clamp_min(1.0)).float()
