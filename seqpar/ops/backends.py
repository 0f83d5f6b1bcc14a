"""The local attention kernels seqpar can call for one block, and what each one serves.

Every backend offers the same two calls on bshd tensors:

    forward(q, k, v, scale, mask)                         -> (out, lse [b, hq, sq])
    backward(dout, q, k, v, out, lse, delta, scale, mask) -> (dq, dk, dv)

`mask` holds the block's keywords (causal, q_positions, k_positions, doc_ids) and its
`MaskKind`. `backward` takes the *final* out and lse of the rows (ring attention merges
them over all blocks first), so every backend computes P = exp(S - lse) from them, as
flash-attention's backward does. Backends whose backward recomputes
delta = rowsum(dout * out) itself (`takes_delta=False`) cannot serve a block whose delta
carries an extra term (a gradient on lse); the registry then picks the next one.

The library backends (PyTorch's fused ops, flash-attn) live in `library_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import compiled, torch_attention
from .masks import MASK_KINDS

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    """One kernel on one device type, with what it declares it serves."""

    name: str                      # what `parallel.attention_kernel` / SEQPAR_ATTENTION_KERNEL names
    device_type: str               # "cpu" or "cuda"
    dtypes: tuple
    mask_kinds: tuple
    forward: Callable
    backward: Callable
    head_dims: tuple | None = None  # None: any head_dim
    native_gqa: bool = True        # False: the glue runs one call per query-head group offset
    takes_delta: bool = True
    # available(device, head_dim=None): present and usable here (built, supported GPU, and
    # for a given head_dim, e.g. enough shared memory per block)
    available: Callable[..., bool] = lambda device, head_dim=None: True
    source: str = ""               # the op it calls, for `seqpar doctor`

    def serves(self, device: torch.device, dtype: torch.dtype, head_dim: int, kind: str,
               custom_delta: bool = False) -> bool:
        return (device.type == self.device_type and dtype in self.dtypes
                and (self.head_dims is None or head_dim in self.head_dims)
                and kind in self.mask_kinds and (self.takes_delta or not custom_delta))

    @property
    def key(self) -> str:
        return f"{self.name}@{self.device_type}"


def _kw(mask: dict) -> dict:
    return {k: mask[k] for k in ("causal", "q_positions", "k_positions", "doc_ids") if k in mask}


# ------------------------------------------------------------------ seqpar's own kernels

def _torch_forward(q, k, v, scale, mask):
    return torch_attention.attention_forward(q, k, v, softmax_scale=scale, **_kw(mask))


def _torch_backward(dout, q, k, v, out, lse, delta, scale, mask):
    return torch_attention.attention_backward(dout, q, k, v, out, lse, delta=delta,
                                              softmax_scale=scale, **_kw(mask))


def _compiled_forward(q, k, v, scale, mask):
    return compiled.attention_forward(q, k, v, softmax_scale=scale, **_kw(mask))


def _compiled_backward(dout, q, k, v, out, lse, delta, scale, mask):
    return compiled.attention_backward(dout, q, k, v, out, lse, delta=delta, softmax_scale=scale,
                                       **_kw(mask))


def _compiled_available(device: torch.device, head_dim: int | None = None) -> bool:
    dtype = compiled.CUDA_ATTENTION_DTYPES[0] if device.type == "cuda" else torch.float32
    return compiled.available(device, dtype, head_dim=head_dim or compiled.CUDA_HEAD_DIMS[0])


TORCH = [Backend("torch", dev, ALL_DTYPES, MASK_KINDS, _torch_forward, _torch_backward,
                 source="seqpar.ops.torch_attention (pure PyTorch, chunked)")
         for dev in ("cpu", "cuda")]

SEQPAR = [
    Backend("seqpar", "cpu", ALL_DTYPES, MASK_KINDS, _compiled_forward, _compiled_backward,
            available=_compiled_available, source="torch.ops.seqpar.attention_fwd/bwd (csrc, C++)"),
    Backend("seqpar", "cuda", compiled.CUDA_ATTENTION_DTYPES, MASK_KINDS, _compiled_forward,
            _compiled_backward, head_dims=compiled.CUDA_HEAD_DIMS, available=_compiled_available,
            source="torch.ops.seqpar.attention_fwd/bwd (csrc, CUDA WMMA)"),
]
