"""Fused rotary position embedding (half rotation, as Llama's `rotate_half`), bshd layout.

`apply_rope(q, k, cos, sin)` takes cos/sin as transformers' rotary modules produce them
([s, r] or [b, s, r], the half-duplicated layout, r <= head_dim: dims past r pass
through). `apply_rope_from_positions` computes cos/sin inside the kernel from explicit
positions, so no [b, s, r] table is ever materialised. `rope_parameters(config)` and
`rope_cos_sin(positions, config)` get the inverse frequencies and attention scaling from
transformers' own rope functions, so every `rope_type` (default, linear, dynamic, yarn,
longrope, llama3) matches the model exactly.

Dispatch: compiled seqpar op (CPU or CUDA) -> pure torch. cos/sin are constants for
autograd (as in transformers, where they are computed under no_grad).
"""

from __future__ import annotations

import torch

from ..errors import SeqparError
from . import compiled


def _check(q, k):
    if q.dim() != 4 or k.dim() != 4:
        raise SeqparError(f"apply_rope expects bshd q/k [batch, seq, heads, head_dim]; got q{tuple(q.shape)} "
                          f"k{tuple(k.shape)}. Transpose Hugging Face [b, h, s, d] with .transpose(1, 2).")


# ---------------------------------------------------------------- pure-torch path

def _rotate(x, cos, sin, backward):
    """Transformers' formula on the first r dims of bshd x; cos/sin [b or 1, s, 1, r]."""
    r = cos.shape[-1]
    half = r // 2
    xr = x[..., :r]
    x1, x2 = xr[..., :half], xr[..., half:]
    if not backward:
        rot = torch.cat((-x2, x1), dim=-1)  # rotate_half
        y = xr * cos + rot * sin
    else:  # transpose of the rotation
        y = xr * cos + torch.cat((x2 * sin[..., half:], -x1 * sin[..., :half]), dim=-1)
    return torch.cat((y, x[..., r:]), dim=-1) if r < x.shape[-1] else y


def _table(t):
    t = t if t.dim() == 3 else t[None]
    return t[:, :, None, :]  # broadcast over heads


def _torch_rope(q, k, cos, sin, inplace, backward=False):
    c, s = _table(cos).to(q.dtype), _table(sin).to(q.dtype)
    qo, ko = _rotate(q, c, s, backward), _rotate(k, c, s, backward)
    if inplace:
        return q.copy_(qo), k.copy_(ko)
    return qo, ko


def _freq_table(positions, inv_freq, scaling, dtype):
    """cos, sin [b or 1, s, r] exactly as transformers' rotary modules compute them."""
    pos = positions if positions.dim() == 2 else positions[None]
    freqs = pos[..., None].float() * inv_freq.to(device=pos.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# ---------------------------------------------------------------- in-place autograd

def _no_heads(x):
    return x.new_empty(x.shape[0], x.shape[1], 0, x.shape[3])


# Autograd cannot let one Function modify two views in place (q and k usually are views
# of their projections), so the in-place path rotates one tensor per Function call; the
# other operand of the fused op is an empty [b, s, 0, d] tensor.
class _RopeInplace(torch.autograd.Function):
    """In place: no copy of x is kept (the gradient of a rotation needs only cos/sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        torch.ops.seqpar.rope_(x, _no_heads(x), cos, sin, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        g = g.contiguous()
        dx, _ = torch.ops.seqpar.rope(g, _no_heads(g), cos, sin, True)
        return dx, None, None


class _RopePosInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, scaling):
        torch.ops.seqpar.rope_pos_(x, _no_heads(x), positions, inv_freq, scaling, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions, inv_freq)
        ctx.scaling = scaling
        return x

    @staticmethod
    def backward(ctx, g):
        positions, inv_freq = ctx.saved_tensors
        g = g.contiguous()
        dx, _ = torch.ops.seqpar.rope_pos(g, _no_heads(g), positions, inv_freq, ctx.scaling, True)
        return dx, None, None, None


# ---------------------------------------------------------------- public API

def apply_rope(q, k, cos, sin, *, inplace: bool = False):
    """(q_embed, k_embed) = transformers' `apply_rotary_pos_emb` on bshd q/k, fused.

    q [b, s, hq, d], k [b, s, hk, d]; cos/sin [s, r] or [b, s, r] (r <= d). With
    `inplace=True` q and k are overwritten (no second copy of the activations) and returned.
    """
    _check(q, k)
    if compiled.available(q.device, q.dtype, op="rope"):
        if inplace:
            return _RopeInplace.apply(q, cos, sin), _RopeInplace.apply(k, cos, sin)
        return torch.ops.seqpar.rope(q, k, cos, sin, False)
    return _torch_rope(q, k, cos, sin, inplace)


def apply_rope_from_positions(q, k, positions, inv_freq, attention_scaling: float = 1.0, *,
                              inplace: bool = False):
    """Like `apply_rope`, with cos/sin computed in the kernel from `positions` ([s] or
    [b, s], global token positions), `inv_freq` [r/2] and `attention_scaling`
    (see `rope_parameters`)."""
    _check(q, k)
    scaling = float(attention_scaling)
    if compiled.available(q.device, q.dtype, op="rope"):
        if inplace:
            return (_RopePosInplace.apply(q, positions, inv_freq, scaling),
                    _RopePosInplace.apply(k, positions, inv_freq, scaling))
        return torch.ops.seqpar.rope_pos(q, k, positions, inv_freq, scaling, False)
    cos, sin = _freq_table(positions.to(q.device), inv_freq, scaling, q.dtype)
    return _torch_rope(q, k, cos, sin, inplace)


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def rope_parameters(config, *, seq_len: int | None = None, device=None):
    """(inv_freq float32 [r/2], attention_scaling) from transformers' own rope functions.

    `seq_len` matters for 'dynamic' and 'longrope' only: pass the full (unsharded)
    sequence length so every sequence-parallel shard uses one frequency table.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # deferred: heavy; ops needs it only here

    rope_type = _rope_type(config)
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        # transformers 5 keeps the default formula on the rotary modules.
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # deferred: heavy
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = fn(config, device, seq_len=seq_len) if seq_len is not None else fn(config, device)
    else:
        raise SeqparError(f"unknown rope_type {rope_type!r}; transformers knows "
                          f"{sorted(ROPE_INIT_FUNCTIONS)} and 'default'.")
    return inv_freq.to(device=device, dtype=torch.float32), float(scaling)


def rope_cos_sin(positions, config, device=None, dtype=torch.float32, *, seq_len: int | None = None):
    """(cos, sin) [s, r] or [b, s, r] for explicit global `positions`, as the model's
    rotary embedding computes them. `seq_len` defaults to max(positions) + 1, as
    transformers' dynamic update does; pass the full length under sequence parallelism."""
    positions = torch.as_tensor(positions, device=device)
    if seq_len is None and _rope_type(config) in ("dynamic", "longrope") and positions.numel():
        seq_len = int(positions.max()) + 1
    inv_freq, scaling = rope_parameters(config, seq_len=seq_len, device=positions.device)
    cos, sin = _freq_table(positions, inv_freq, scaling, dtype)
    return (cos, sin) if positions.dim() == 2 else (cos[0], sin[0])
