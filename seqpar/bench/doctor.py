"""``seqpar doctor``: which attention kernels this machine has, and whether to trust them
(exit status 1 when no kernel is correct).

For one (device, dtype, head_dim) it runs every kernel's self-test (the same one that
guards training: a small GQA block, forward and backward, every mask kind the kernel
declares, against the float64 oracle) and prints, per kernel: available, verified (max
relative error), the error, a quick speed figure (causal forward+backward of one block),
and which kernel `auto` picks for each mask kind. Exit status 1 when no kernel is correct.
"""

from __future__ import annotations

import time

import torch

from ..commands import about
from ..errors import SeqparError
from ..ops import registry
from ..ops._build import load_extension
from ..ops.attention import run_backward, run_forward
from ..ops.masks import CAUSAL, MaskKind
from ..tables import markdown_header, markdown_row


def _speed(backend, device, dtype, head_dim, seq_len: int, heads: int) -> str:
    """Milliseconds of one causal forward+backward (median of 3), if the kernel serves it."""
    if not backend.serves(device, dtype, head_dim, CAUSAL):
        return "-"
    q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
    kind, mask = MaskKind(CAUSAL), {"causal": True}
    times = []
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out, lse = run_forward(backend, q, k, v, None, mask, kind)
        run_backward(backend, dout, q, k, v, out, lse, None, None, mask, kind)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return f"{sorted(times[1:])[1] * 1e3:.1f}"


def run_doctor(device: str, dtype: str, head_dim: int, seq_len: int, heads: int) -> int:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SeqparError("--device cuda: no CUDA device is visible to torch; use --device cpu.")
    dt = getattr(torch, dtype)
    ext = load_extension()
    print(f"seqpar doctor | {dev} {dtype} head_dim={head_dim} | torch {torch.__version__} | "
          f"compiled ops: {ext.kind} ({ext.reason}) | order: {registry.preferred_kernel()}")
    headers = ["kernel", "available", "verified", "max rel error", "mask kinds tested",
               f"ms fwd+bwd (S={seq_len}, H={heads})", "error", "op"]
    print("\n".join(markdown_header(headers, "lllrlrll")))
    correct = 0
    for backend in registry.order(dev.type):
        avail = backend.available(dev)
        serves = any(backend.serves(dev, dt, head_dim, k) for k in registry.SELF_TEST_KINDS)
        verdict = registry.verify(backend, dev, dt, head_dim) if avail and serves else None
        ok = verdict is not None and verdict.ok
        correct += ok
        speed = _speed(backend, dev, dt, head_dim, seq_len, heads) if ok else "-"
        err = "" if verdict is None else f"{verdict.max_error:.1e}"
        why = ("not available here" if not avail else "does not serve this dtype/head_dim"
               if not serves else verdict.error)
        print(markdown_row([backend.name, "yes" if avail else "no", "yes" if ok else "no", err,
                            ",".join(verdict.kinds) if verdict else "-", speed, why, backend.source], len(headers)),
              flush=True)  # each kernel as soon as it is checked
    if not correct:
        print("no correct attention kernel on this device: training would be wrong; see the errors above")
        return 1
    print(f"auto serves: {registry.plan_summary(dev, dt, head_dim)}")
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser(
        "doctor", help="self-test every attention kernel here and say which one serves what",
        description=about(__doc__))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens of the timed block")
    p.add_argument("--heads", type=int, default=8)
    p.set_defaults(func=lambda a: run_doctor(
        a.device, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"),
        a.head_dim or (128 if a.device.startswith("cuda") else 64), a.seq_len, a.heads))
