"""Which kernel serves a block: a preference order, and a self-test before any trust.

Per block call, the first backend in the preference order that (1) declares it serves
the block's device, dtype, head_dim and mask kind, (2) is available in this process and
(3) has passed its self-test for (device, dtype, head_dim) serves it. `torch` (pure
PyTorch) serves everything and is always last.

Order: `set_attention_kernel(name)` (the run config's `parallel.attention_kernel`) or
`SEQPAR_ATTENTION_KERNEL`; `auto` (default) is the order measured fastest by `seqpar
bench kernels` on that device type (AUTO_ORDER). A named kernel is tried first, then the
auto order for the blocks it does not serve.

Self-test: the first time a backend could serve a (device, dtype, head_dim) key, it runs
one small block with GQA against the float64 oracle on the CPU, forward and backward,
for every mask kind it declares among a test set. A backend that disagrees or raises is
disabled for the key with one warning naming it and the error. `agree_on_kernels` (called
by ring / Ulysses / hybrid with their group) makes every rank disable what any rank
disabled, so ranks never run different kernels.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import SeqparError
from . import backends, library_kernels, rewrites
from .masks import BOTTOM_RIGHT, CAUSAL, DOCUMENTS, NONE, POSITIONS, SHIFTED, TOP_LEFT, classify_mask
from .reference import attention_reference

KERNEL_NAMES = ("auto", "flash", "cudnn", "efficient", "flash-attn", "seqpar", "torch")
ENV = "SEQPAR_ATTENTION_KERNEL"
# Fastest first, as measured by `seqpar bench kernels` (README). CPU: PyTorch's flash
# kernel beat seqpar's C++ op 2.4-4.6x on every length measured (2-core CPU, 2026-12-03).
# CUDA: not measured yet (no GPU has been available); library kernels before seqpar's own
# WMMA kernel, which a review estimated at 0.25-0.45x FlashAttention-2.
AUTO_ORDER = {"cpu": ("flash", "seqpar", "torch"),
              "cuda": ("flash-attn", "cudnn", "flash", "efficient", "seqpar", "torch")}
ALL_BACKENDS = ([library_kernels.CPU_FLASH] + library_kernels.CUDA_LIBRARY + [library_kernels.FLASH_ATTN]
                + backends.SEQPAR + backends.TORCH)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SELF_TEST_KINDS = (NONE, CAUSAL, TOP_LEFT, BOTTOM_RIGHT, SHIFTED, DOCUMENTS, POSITIONS)


@dataclass
class Verdict:
    ok: bool
    max_error: float = float("nan")
    error: str = ""
    kinds: tuple = ()
    seconds: float = 0.0


@dataclass
class _State:
    preferred: str | None = None                          # set_attention_kernel; None: env / auto
    verdicts: dict = field(default_factory=dict)          # (backend key, device, dtype, hd) -> Verdict
    served: dict = field(default_factory=dict)            # (device type, mask kind) -> backend names used
    agreed: set = field(default_factory=set)              # (device, dtype, hd, group) agreed on


_state = _State()


def set_attention_kernel(name: str | None) -> None:
    """Prefer `name` (one of KERNEL_NAMES) for this process; None returns to env / auto."""
    if name is not None:
        check_kernel_name(name)
    _state.preferred = name


def check_kernel_name(name: str, what: str = "parallel.attention_kernel") -> str:
    if name not in KERNEL_NAMES:
        raise SeqparError(f"{what} must be one of {', '.join(KERNEL_NAMES)}; got {name!r}.")
    return name


def preferred_kernel() -> str:
    if _state.preferred is not None:
        return _state.preferred
    return check_kernel_name(os.environ.get(ENV, "auto").strip() or "auto", ENV)


def order(device_type: str) -> list[backends.Backend]:
    names = list(AUTO_ORDER.get(device_type, ("torch",)))
    first = preferred_kernel()
    if first != "auto":
        names = [first] + [n for n in names if n != first]
    by_name = {b.name: b for b in ALL_BACKENDS if b.device_type == device_type}
    return [by_name[n] for n in names if n in by_name]


def _key(backend, device, dtype, head_dim):
    return (backend.key, str(torch.device(device)), dtype, int(head_dim))


def select(device, dtype, head_dim, kind: str, custom_delta: bool = False,
           record: bool = True) -> backends.Backend:
    """The backend that serves a block (see module doc); pure torch when nothing else does.
    `record=False`: only ask (the block is not run), so reports stay true."""
    device = torch.device(device)
    for backend in order(device.type):
        if (backend.serves(device, dtype, head_dim, kind, custom_delta)
                and backend.available(device, head_dim) and verify(backend, device, dtype, head_dim).ok):
            if record:
                _state.served.setdefault((device.type, kind), set()).add(backend.name)
            return backend
    raise SeqparError(f"no attention kernel serves {device.type} {dtype} head_dim={head_dim} "
                      f"mask '{kind}', and the pure-torch kernel failed its self-test: "
                      f"{verdicts_text()}. Run `seqpar doctor`.")


def verify(backend, device, dtype, head_dim) -> Verdict:
    """The backend's self-test verdict for this key, running the test the first time."""
    key = _key(backend, device, dtype, head_dim)
    if key not in _state.verdicts:
        _state.verdicts[key] = _self_test(backend, torch.device(device), dtype, head_dim)
        if not _state.verdicts[key].ok:
            _warn_disabled(backend, key, _state.verdicts[key].error)
    return _state.verdicts[key]


def candidates(device, dtype, head_dim) -> list[backends.Backend]:
    """Backends that could serve some block of this key here (the ones a run may use)."""
    device = torch.device(device)
    return [b for b in order(device.type)
            if any(b.serves(device, dtype, head_dim, kind) for kind in SELF_TEST_KINDS)
            and b.available(device, head_dim)]


def agree_on_kernels(device, dtype, head_dim, all_ranks_ok, group_key=None) -> None:
    """Self-test every candidate for this key, then disable on this rank whatever failed on
    any rank. `all_ranks_ok(list[bool]) -> list[bool]` is the group's logical AND."""
    _state.agreed.add((str(torch.device(device)), dtype, int(head_dim), group_key))
    cands = candidates(device, dtype, head_dim)
    agreed = all_ranks_ok([verify(b, device, dtype, head_dim).ok for b in cands])
    for backend, ok in zip(cands, agreed):
        verdict = _state.verdicts[_key(backend, device, dtype, head_dim)]
        if verdict.ok and not ok:
            verdict.ok, verdict.error = False, "failed its self-test on another rank"
            _warn_disabled(backend, _key(backend, device, dtype, head_dim), verdict.error)


def agreed(device, dtype, head_dim, group_key=None) -> bool:
    """True once the ranks of a group agreed on this key's kernels."""
    return (str(torch.device(device)), dtype, int(head_dim), group_key) in _state.agreed


def _warn_disabled(backend, key, error: str) -> None:
    warnings.warn(f"seqpar: attention kernel '{backend.name}' disabled for {key[1]} {key[2]} "
                  f"head_dim={key[3]}: {error}. The next kernel in the order serves instead.",
                  RuntimeWarning, stacklevel=3)


def reset() -> None:
    """Forget every verdict (tests, or after changing the preference order)."""
    _state.verdicts.clear()
    _state.served.clear()
    _state.agreed.clear()


# ------------------------------------------------------------------ the self-test

def _test_masks(s: int, kind: str, doc_boundary: int):
    """Mask keywords for one test block of `kind` (sq = sk = s)."""
    pos = torch.arange(s)
    docs = (pos >= doc_boundary).long()
    return {
        NONE: dict(causal=False),
        CAUSAL: dict(causal=True),
        TOP_LEFT: dict(causal=True, q_positions=pos[: s // 2], k_positions=pos),
        BOTTOM_RIGHT: dict(causal=True, q_positions=pos[s // 2:], k_positions=pos),
        SHIFTED: dict(causal=True, q_positions=2 * pos, k_positions=2 * pos + 1),  # stripe, src > rank
        DOCUMENTS: dict(causal=True, doc_ids=docs),
        POSITIONS: dict(causal=True, q_positions=pos.flip(0), k_positions=pos.flip(0), doc_ids=docs),
    }[kind]


def _self_test(backend, device, dtype, head_dim) -> Verdict:
    kinds = tuple(k for k in SELF_TEST_KINDS if backend.serves(device, dtype, head_dim, k))
    t0 = time.perf_counter()
    try:
        worst = max(_check_kind(backend, device, dtype, head_dim, kind) for kind in kinds)
    except Exception as e:  # a kernel that raises is as untrusted as a wrong one
        return Verdict(False, error=f"{type(e).__name__}: {str(e).strip()[:300]}", kinds=kinds)
    ok = worst <= TOLERANCE.get(dtype, 3e-2)
    err = "" if ok else f"max error {worst:.2e} against the float64 oracle (tolerance {TOLERANCE[dtype]:.0e})"
    return Verdict(ok, worst, err, kinds, time.perf_counter() - t0)


def _check_kind(backend, device, dtype, head_dim, kind) -> float:
    """Relative max error of out, lse, dq, dk, dv of one small GQA block against the oracle."""
    gen = torch.Generator().manual_seed(1234)
    s = 48
    shapes = [(1, s, 4, head_dim), (1, s, 2, head_dim), (1, s, 2, head_dim)]
    q64, k64, v64 = (torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in shapes)
    mask = _test_masks(s, kind, doc_boundary=19)
    if "q_positions" in mask and len(mask["q_positions"]) < s:
        q64 = q64[:, : len(mask["q_positions"])]
    dout64 = torch.randn(q64.shape, generator=gen, dtype=torch.float64)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q64, k64, v64, dout64))
    dev_mask = {n: (t.to(device) if torch.is_tensor(t) else t) for n, t in mask.items()}
    mask_kind = classify_mask(q.shape[1], s, **mask)
    # The dispatcher's rewrites apply to the test too.
    out, lse = rewrites.run_forward(rewrites.fixed(backend), q, k, v, None, dev_mask, mask_kind)
    grads = rewrites.run_backward(rewrites.fixed(backend), dout, q, k, v, out, lse, None, None, dev_mask,
                                  mask_kind)

    # The test may run inside an autograd Function's forward, under a checkpoint's or an
    # offloader's saved-tensor hooks: identity hooks keep the oracle's graph out of theirs.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
        ref_out, ref_lse = attention_reference(*leaves, **mask)
        ref_out.backward(dout64)
    pairs = [(out, ref_out), (lse, ref_lse)] + list(zip(grads, (t.grad for t in leaves)))
    return max(_rel_err(got, want) for got, want in pairs)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().double()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")  # -inf LSE rows must stay -inf, and nothing else may overflow
    diff = (got[finite] - want[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    return float(diff / want[finite].abs().max().clamp_min(1.0)) if finite.any() else 0.0


# ------------------------------------------------------------------ reports

def verdicts_text() -> str:
    return "; ".join(f"{k[0]} {k[1]} {k[2]} d{k[3]}: {'ok' if v.ok else v.error}"
                     for k, v in _state.verdicts.items()) or "none run"


def served_summary(device_type: str | None = None) -> dict:
    """{mask kind: backend names} that served blocks so far in this process."""
    return {kind: sorted(names) for (dev, kind), names in sorted(_state.served.items())
            if device_type is None or dev == device_type}


def plan_summary(device, dtype, head_dim) -> str:
    """Which backend would serve each mask kind, e.g. 'flash: none,causal | seqpar: documents,...'.
    Bottom-right blocks are left out: the dispatcher runs them as an unmasked plus a
    top-left block whenever another kernel serves those (`rewrites._split_keys`)."""
    by_backend: dict[str, list[str]] = {}
    for kind in (k for k in SELF_TEST_KINDS if k != BOTTOM_RIGHT):
        name = select(device, dtype, head_dim, kind).name
        by_backend.setdefault(name, []).append(kind)
    return " | ".join(f"{name}: {','.join(kinds)}" for name, kinds in by_backend.items())
