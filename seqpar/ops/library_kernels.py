"""Library attention kernels as seqpar backends: PyTorch's fused ops and flash-attn.

All of them return the log-sum-exp, which is what lets ring attention merge blocks:
- CPU: `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`): bhsd, native
  GQA, float64/32/bf16/fp16, SDPA's causal = top-left aligned.
- CUDA: PyTorch's flash (`_scaled_dot_product_flash_attention`), cuDNN
  (`_scaled_dot_product_cudnn_attention`) and memory-efficient (`_efficient_attention_forward`)
  ops with their backwards, as PyTorch's own context parallelism calls them per block;
  the `flash-attn` package (FA2) when installed, whose causal is bottom-right aligned.

The glue is shared: bshd <-> the op's layout, the op's LSE reshaped to [b, h, sq], and
GQA for ops without it: one call per offset r in a query-head group, over the query
heads r, r+g, r+2g, ... (head i of them shares K/V head i), so every call is plain
multi-head attention on the unexpanded K/V. Expanding K/V to the query heads instead
held K, V and their gradients at query size (a third of the planned peak of Llama-3-8B
at 1M tokens); the calls hold 1/g of q, out and their gradients at a time. The CPU
flash op has the same bhsd + LSE contract as the CUDA flash op, so the CPU tests
exercise the shared glue (declared without GQA for the test).
No CUDA backend serves a block before it passed the registry's self-test.
"""

from __future__ import annotations

import inspect

import torch

from .backends import ALL_DTYPES, Backend
from .dtypes import accumulate_dtype
from .masks import BOTTOM_RIGHT, CAUSAL, NONE, TOP_LEFT

aten = torch.ops.aten
TOP_LEFT_KINDS = (NONE, CAUSAL, TOP_LEFT)          # SDPA's is_causal
BOTTOM_RIGHT_KINDS = (NONE, CAUSAL, BOTTOM_RIGHT)  # flash-attn's causal
HALF = (torch.bfloat16, torch.float16)


def _group_offsets(q: torch.Tensor, k: torch.Tensor):
    """For a GQA block on an op without GQA: the query-head slices r::g, each with as many
    heads as K/V (head i of the slice belongs to K/V head i: repeat_interleave order)."""
    g = q.shape[2] // k.shape[2]
    return [slice(r, None, g) for r in range(g)]


def fused_backend(name, device_type, dtypes, kinds, fwd_op, bwd_op, *, bshd=False,
                  native_gqa=False, head_dims=None, available=lambda device, head_dim=None: True, source=""):
    """A Backend around a fused op pair taking (q, k, v, is_causal, scale) in bhsd (or
    bshd) and returning (out, lse); bwd_op(dout, q, k, v, out, lse, is_causal, scale)."""

    def layout(t):
        return t if bshd else t.transpose(1, 2)

    def call_forward(q, k, v, causal, scale):
        out, lse = fwd_op(layout(q), layout(k), layout(v), causal, scale)
        b, sq, hq, _ = q.shape
        return layout(out), lse[..., :sq].reshape(b, hq, sq)

    def forward(q, k, v, scale, mask):
        causal = mask["kind"].kind != NONE
        if native_gqa or q.shape[2] == k.shape[2]:
            return call_forward(q, k, v, causal, scale)
        out, lse = torch.empty_like(q), None
        for heads in _group_offsets(q, k):  # contiguous slices: the layout the op is tested on
            out[:, :, heads], lse_r = call_forward(q[:, :, heads].contiguous(), k, v, causal, scale)
            if lse is None:
                lse = lse_r.new_empty(q.shape[0], q.shape[2], q.shape[1])
            lse[:, heads] = lse_r
        return out, lse

    def call_backward(dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = bwd_op(layout(dout), layout(q), layout(k), layout(v), layout(out),
                            lse.float() if lse.dtype != q.dtype else lse, causal, scale)
        return layout(dq), layout(dk), layout(dv)

    def backward(dout, q, k, v, out, lse, delta, scale, mask):
        causal = mask["kind"].kind != NONE
        if native_gqa or q.shape[2] == k.shape[2]:
            return call_backward(dout, q, k, v, out, lse, causal, scale)
        # dK/dV summed over the group in float32, as one sum over expanded heads would be.
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(t.shape, dtype=accumulate_dtype(t.dtype), device=t.device) for t in (k, v))
        for heads in _group_offsets(q, k):
            dq[:, :, heads], dk_r, dv_r = call_backward(
                dout[:, :, heads].contiguous(), q[:, :, heads].contiguous(), k, v,
                out[:, :, heads].contiguous(), lse[:, heads].contiguous(), causal, scale)
            dk += dk_r
            dv += dv_r
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    return Backend(name, device_type, dtypes, kinds, forward, backward, head_dims=head_dims,
                   native_gqa=native_gqa, takes_delta=False, available=available, source=source)


# ------------------------------------------------------------------ CPU: PyTorch's flash

def _cpu_flash_fwd(q, k, v, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_flash_bwd(dout, q, k, v, out, lse, causal, scale):
    # The op wants the LSE in its own dtype (float64 for float64 inputs, else float32).
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale)


CPU_FLASH = fused_backend("flash", "cpu", ALL_DTYPES, TOP_LEFT_KINDS, _cpu_flash_fwd, _cpu_flash_bwd,
                          native_gqa=True, source="aten._scaled_dot_product_flash_attention_for_cpu")


# ------------------------------------------------------------------ CUDA: PyTorch's fused ops

def _sm80(device: torch.device, head_dim: int | None = None) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def _empty_rng(q):
    return torch.empty(0, dtype=torch.int64, device=q.device)


def _flash_fwd(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    sq, sk = q.shape[2], k.shape[2]
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, sq, sk, 0.0, causal,
        _empty_rng(q), _empty_rng(q), scale=scale)


def _cudnn_fwd(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                             scale=scale)
    return out, lse


def _cudnn_bwd(dout, q, k, v, out, lse, causal, scale):
    b, h, sq, _ = q.shape
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.reshape(b, h, sq, 1).contiguous(), _empty_rng(q), _empty_rng(q), None,
        None, None, sq, k.shape[2], 0.0, causal, scale=scale)


def _mask_type(causal: bool) -> int:
    return 1 if causal else 0  # 1: causal from the top left, as SDPA


def _efficient_fwd(q, k, v, causal, scale):  # bshd in, bshd out
    out, lse, *_ = aten._efficient_attention_forward(q, k, v, None, None, None, None, None, 0.0,
                                                     _mask_type(causal), True, scale=scale)
    return out, lse


def _efficient_bwd(dout, q, k, v, out, lse, causal, scale):
    sq = q.shape[1]
    padded = -(-sq // 32) * 32  # the op's LSE rows are padded to a multiple of 32
    lse = torch.nn.functional.pad(lse, (0, padded - sq)).contiguous()
    dq, dk, dv, _ = aten._efficient_attention_backward(
        dout, q, k, v, None, out, None, None, sq, k.shape[1], lse, 0.0, _empty_rng(q), _empty_rng(q),
        _mask_type(causal), False, scale=scale)
    return dq, dk, dv


CUDA_LIBRARY = [
    # PyTorch's CUDA flash op is FA2 inside: causal with sq != sk is bottom-right aligned
    # (measured on an H200: the top-left self-test failed with max error 0.96).
    fused_backend("flash", "cuda", HALF, BOTTOM_RIGHT_KINDS, _flash_fwd, _flash_bwd,
                  head_dims=tuple(range(8, 257, 8)), available=_sm80,
                  source="aten._scaled_dot_product_flash_attention"),
    fused_backend("cudnn", "cuda", HALF, TOP_LEFT_KINDS, _cudnn_fwd, _cudnn_bwd,
                  head_dims=tuple(range(8, 129, 8)), available=_sm80,
                  source="aten._scaled_dot_product_cudnn_attention"),
    fused_backend("efficient", "cuda", (torch.float32,) + HALF, TOP_LEFT_KINDS, _efficient_fwd,
                  _efficient_bwd, bshd=True, available=lambda d, head_dim=None: torch.cuda.is_available(),
                  source="aten._efficient_attention_forward"),
]


# ------------------------------------------------------------------ CUDA: flash-attn (FA2)

def _flash_attn():
    try:
        from flash_attn import flash_attn_interface  # deferred: optional extra (flash-attn)
        return flash_attn_interface
    except Exception:  # not installed, or built for another torch: the backend is unavailable
        return None


def _call(fn, **kw):
    """Call with the keywords this flash-attn version accepts (its signatures drift)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kw.items() if k in params})


def _fa_fwd(q, k, v, causal, scale):  # bshd
    res = _call(_flash_attn()._flash_attn_forward, q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale,
                causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
                softcap=0.0, alibi_slopes=None, return_softmax=False)
    return res[0], res[1] if len(res) < 6 else res[5]  # v2.6+: (out, lse, ...); older: 8-tuple


def _fa_bwd(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call(_flash_attn()._flash_attn_backward, dout=dout, q=q, k=k, v=v, out=out,
          softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
          causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
          softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
    return dq, dk, dv


FLASH_ATTN = fused_backend("flash-attn", "cuda", HALF, BOTTOM_RIGHT_KINDS, _fa_fwd, _fa_bwd, bshd=True,
                           native_gqa=True, head_dims=tuple(range(8, 257, 8)),
                           available=lambda d, head_dim=None: _sm80(d) and _flash_attn() is not None,
                           source="flash_attn.flash_attn_interface (FA2)")
