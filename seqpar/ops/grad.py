"""The one backward rule of a local attention block.

Both differentiable faces of the local kernel use it: `seqpar.ops.attention` (through
the kernel registry) and the compiled op `torch.ops.seqpar.attention_fwd` (its
registered autograd formula, which `torch.compile` traces). Only the kernel that runs
the backward differs.
"""

from __future__ import annotations

from typing import Callable

import torch

from .torch_attention import attention_delta


def block_vjp(dout, dlse, q, k, v, out, backward: Callable) -> tuple:
    """(dq, dk, dv), in the dtypes of q, k, v, of one block whose forward gave `out`.

    `dout`, `dlse`: the gradients on out and lse (None for an unused output).
    `backward(dout, delta, custom_delta)` runs a kernel's backward; `custom_delta` says
    delta carries a gradient on lse, which only kernels that take delta can serve.
    """
    if dout is None:
        dout = torch.zeros_like(out)
    delta = attention_delta(dout, out)
    if dlse is not None:
        # d lse / d score = p, so a gradient on lse enters as a shift of delta.
        delta = delta - dlse.to(delta.dtype)
    dq, dk, dv = backward(dout, delta, dlse is not None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
