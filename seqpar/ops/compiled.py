"""Python face of the compiled seqpar ops (`torch.ops.seqpar.*`, built from csrc/).

Registers, once the library is loaded, the fake (meta) kernels that let `torch.compile`
trace the ops and their autograd formulas (the backward kernels are ops of their own),
and wraps the ops with the keyword signature of `seqpar.ops.torch_attention`.

`available(device, dtype)` says whether a compiled kernel serves that device and dtype;
callers fall back to the pure-torch path when it does not.
"""

from __future__ import annotations

import math
import threading

import torch

from . import _build
from .dtypes import accumulate_dtype
from .grad import block_vjp
from .masks import check_attention_inputs, split_doc_ids

CUDA_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)  # tensor-core kernels only
CUDA_HEAD_DIMS = (64, 80, 128)  # instantiated in csrc/attention_cuda.cu
_CUDA_ROPE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_registered = False
_reg_lock = threading.Lock()


def _ops():
    if not _registered and not loaded():
        raise RuntimeError(f"seqpar compiled ops are not loaded ({_build.extension_status().reason}); "
                           "use seqpar.ops.attention_forward, which falls back to pure torch.")
    return torch.ops.seqpar


def loaded() -> bool:
    """Build/load the extension (first call only) and register the Python side."""
    global _registered
    status = _build.load_extension()
    if not status.loaded:
        return False
    if not _registered:
        with _reg_lock:
            if not _registered:
                _register()
                _registered = True
    return True


def available(device: torch.device, dtype: torch.dtype | None = None, *, op: str = "attention",
              head_dim: int | None = None) -> bool:
    """True when a compiled kernel serves tensors of this device, dtype (and head_dim)."""
    if not loaded():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and _build.extension_status().cuda:
        if torch.cuda.get_device_capability(device) < _build.MIN_CUDA_CAPABILITY:
            return False  # built for sm_80+ only: a launch would fail with "no kernel image"
        if op == "rope":
            return dtype in _CUDA_ROPE_DTYPES
        return (dtype in CUDA_ATTENTION_DTYPES and head_dim in CUDA_HEAD_DIMS  # d128 > sm_86/89's smem
                and torch.ops.seqpar.attention_cuda_smem_bytes(head_dim)
                <= torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    return False


def backend_name() -> str:
    """'compiled-cuda' / 'compiled-cpu' when the extension is loaded, else 'torch'."""
    if not loaded():
        return "torch"
    return "compiled-cuda" if _build.extension_status().cuda and torch.cuda.is_available() else "compiled-cpu"


# ---------------------------------------------------------------- fake (meta) kernels

def _register() -> None:
    lib = "seqpar::"

    @torch.library.register_fake(lib + "attention_fwd")
    def _(q, k, v, causal, scale, q_positions=None, k_positions=None, q_doc_ids=None, k_doc_ids=None):
        b, sq, hq, _d = q.shape
        return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=accumulate_dtype(q.dtype))

    @torch.library.register_fake(lib + "attention_bwd")
    def _(dout, q, k, v, out, lse, delta, causal, scale, q_positions=None, k_positions=None,
          q_doc_ids=None, k_doc_ids=None):
        acc = accumulate_dtype(q.dtype)
        return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc), v.new_empty(v.shape, dtype=acc)

    @torch.library.register_fake(lib + "rope")
    def _(q, k, cos, sin, backward=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake(lib + "rope_pos")
    def _(q, k, positions, inv_freq, scaling, backward=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake(lib + "rope_")
    def _(q, k, cos, sin, backward=False):
        return None

    @torch.library.register_fake(lib + "rope_pos_")
    def _(q, k, positions, inv_freq, scaling, backward=False):
        return None

    torch.library.register_autograd(lib + "attention_fwd", _attention_bwd_rule,
                                    setup_context=_attention_setup)
    torch.library.register_autograd(lib + "rope", _rope_bwd_rule, setup_context=_rope_setup)
    torch.library.register_autograd(lib + "rope_pos", _rope_pos_bwd_rule, setup_context=_rope_pos_setup)


# ---------------------------------------------------------------- autograd formulas

def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale, q_pos, k_pos, q_doc, k_doc = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc)
    ctx.causal, ctx.scale = causal, scale


def _attention_bwd_rule(ctx, dout, dlse):
    q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors

    def kernel(dout, delta, _custom_delta):  # the op takes delta: any delta is served
        return _ops().attention_bwd(dout, q, k, v, out, lse, delta.contiguous(), ctx.causal, ctx.scale,
                                    q_pos, k_pos, q_doc, k_doc)

    return (*block_vjp(dout, dlse, q, k, v, out, kernel), None, None, None, None, None, None)


def _rope_setup(ctx, inputs, output):
    _q, _k, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward
    ctx.outs = (output[0].new_empty(0), output[0].shape, output[1].shape)


def _rope_bwd_rule(ctx, gq, gk):
    cos, sin = ctx.saved_tensors
    gq, gk = _zeros_if_none(gq, gk, ctx)
    # The gradient of a rotation is its transpose; cos/sin are treated as constants.
    dq, dk = _ops().rope(gq, gk, cos, sin, not ctx.backward)
    return dq, dk, None, None, None


def _rope_pos_setup(ctx, inputs, output):
    _q, _k, positions, inv_freq, scaling, backward = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.scaling, ctx.backward = scaling, backward
    ctx.outs = (output[0].new_empty(0), output[0].shape, output[1].shape)


def _rope_pos_bwd_rule(ctx, gq, gk):
    positions, inv_freq = ctx.saved_tensors
    gq, gk = _zeros_if_none(gq, gk, ctx)
    dq, dk = _ops().rope_pos(gq, gk, positions, inv_freq, ctx.scaling, not ctx.backward)
    return dq, dk, None, None, None, None


def _zeros_if_none(gq, gk, ctx):
    """Autograd passes None for an unused output; the kernel wants both gradients."""
    like, q_shape, k_shape = ctx.outs
    gq = like.new_zeros(q_shape) if gq is None else gq
    gk = like.new_zeros(k_shape) if gk is None else gk
    return gq, gk


# ---------------------------------------------------------------- keyword wrappers

def _scale(q, softmax_scale):
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _mask_tensors(q, k, causal, q_positions, k_positions, doc_ids):
    q_doc, k_doc = split_doc_ids(doc_ids, q.shape[1], k.shape[1])
    if not causal:  # positions only shape the causal mask
        q_positions = k_positions = None
    return q_positions, k_positions, q_doc, k_doc


def attention_forward(q, k, v, *, causal=False, softmax_scale=None, q_positions=None,
                      k_positions=None, doc_ids=None):
    """(out, lse) of one block through `torch.ops.seqpar.attention_fwd`."""
    check_attention_inputs(q, k, v)
    masks = _mask_tensors(q, k, causal, q_positions, k_positions, doc_ids)
    # Ring/Ulysses hand strided views (slices of a stacked K/V): the kernels want bshd rows.
    return _ops().attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), bool(causal),
                                _scale(q, softmax_scale), *masks)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None,
                       q_positions=None, k_positions=None, doc_ids=None, delta=None):
    """(dq, dk, dv) in the accumulation dtype through `torch.ops.seqpar.attention_bwd`."""
    masks = _mask_tensors(q, k, causal, q_positions, k_positions, doc_ids)
    return _ops().attention_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                out.contiguous(), lse.contiguous(),
                                None if delta is None else delta.contiguous(), bool(causal),
                                _scale(q, softmax_scale), *masks)
