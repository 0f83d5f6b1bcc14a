"""`seqpar bench loss`: peak memory of one causal-LM loss step (forward + backward) above
its inputs, each path and length in its own process (CPU): transformers' default loss
path against seqpar's tiled loss, as a ratio.

    from seqpar.bench.loss import run_loss_memory_bench
    run_loss_memory_bench([8192, 32768], vocab=131072, hidden=256, dtype="bfloat16")

Each (path, length) runs in its own spawned process (`seqpar.parallel.spawn.run_distributed`
with one rank). The process builds hidden [1, S, H] and the LM head weight [V, H] (both
``dtype``, both requiring grad) and random labels, then takes its memory baseline
(`seqpar.bench.attention.PeakMemory`: current RSS; VmHWM reset through
/proc/self/clear_refs), so the number reported is the loss step's own extra memory:
logits, softmax temporaries and the gradients of hidden and weight.

- ``transformers``: what a transformers causal LM + Trainer do: ``logits = lm_head(hidden)``
  (kept alive through the loss forward, as the model's forward returns them), then
  ``transformers.loss.loss_utils.ForCausalLMLoss`` (``.float()``, cross_entropy) with the
  labels passed as already-shifted ``shift_labels``; the logits are dropped before backward.
- ``seqpar tiled``: `seqpar.model.loss.sharded_cross_entropy` (tiled, no group).

A process may be given an address-space limit (``mem_limit_gib``, above what it has
mapped after start-up) so a step that does not fit fails with an allocation error, reported
as "out of memory", instead of waking the kernel's OOM killer on a shared machine.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from ..commands import about
from ..model.loss import default_chunk_size, sharded_cross_entropy
from ..parallel.spawn import DistributedRunError, run_distributed
from ..tables import markdown_table
from ..units import GIB, MIB, parse_token_list
from .attention import PeakMemory

PATHS = ("transformers", "seqpar tiled")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _loss_step(path, seq_len, vocab, hidden_size, dtype_name, chunk_size, seed, mem_limit_bytes):
    """One path at one length, in a spawned process; returns the memory readings."""
    dtype = getattr(torch, dtype_name)

    def step(hidden, weight, labels):
        if path == "transformers":
            logits = F.linear(hidden, weight)  # lm_head, kept by the model's output
            loss = ForCausalLMLoss(logits, None, weight.shape[0], shift_labels=labels)
            del logits  # the Trainer drops the model output before backward
        else:
            loss = sharded_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
        loss.backward()
        return loss.item()

    def inputs(s, v):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, s, hidden_size, generator=g).to(dtype).requires_grad_(True)
        weight = (torch.randn(v, hidden_size, generator=g) / hidden_size ** 0.5).to(dtype)
        labels = torch.randint(0, v, (1, s), generator=g)
        return hidden, weight.requires_grad_(True), labels

    step(*inputs(64, 1024))  # prime: lazy imports, kernels, allocator arenas
    if mem_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size_bytes() + mem_limit_bytes,
                                                resource.getrlimit(resource.RLIMIT_AS)[1]))
    hidden, weight, labels = inputs(seq_len, vocab)
    mem = PeakMemory(torch.device("cpu"))
    mem.start()  # inputs exist: what follows is the loss step's own memory
    mem.reset_peak()
    t0 = time.perf_counter()
    try:
        loss, error = step(hidden, weight, labels), None
    except (torch.OutOfMemoryError, MemoryError) as exc:
        loss, error = None, f"out of memory ({type(exc).__name__})"
    except RuntimeError as exc:
        if "alloc" not in str(exc).lower():
            raise
        loss, error = None, "out of memory"
    seconds = time.perf_counter() - t0
    return {"memory": mem.result(), "loss": loss, "error": error, "seconds": seconds}


def run_loss_memory_bench(seq_len, vocab=131072, hidden=256, dtype="bfloat16", *,
                          chunk_size=None, paths=PATHS, seed=0, mem_limit_gib=None,
                          timeout=3600.0, out=None) -> list[dict]:
    """Measure every path at every length (``seq_len``: an int or a list), print a table
    to ``out`` (stdout) and return one dict per (length, path)."""
    lengths = [seq_len] if isinstance(seq_len, int) else list(seq_len)
    limit = int(mem_limit_gib * GIB) if mem_limit_gib else None
    chunk = chunk_size or default_chunk_size(vocab)
    rows = []
    for s in lengths:
        for path in paths:
            print(f"[bench loss] {path} S={s} V={vocab} H={hidden} {dtype}: running...",
                  file=sys.stderr, flush=True)
            try:
                r = run_distributed(_loss_step, 1, path, s, vocab, hidden, dtype, chunk, seed, limit,
                                    timeout=timeout)[0]
            except DistributedRunError as exc:  # e.g. killed by the OOM killer
                r = {"memory": None, "loss": None, "seconds": None,
                     "error": f"failed: {str(exc).strip().splitlines()[-1]}"}
            rows.append({"path": path, "seq_len": s, "vocab": vocab, "hidden": hidden,
                         "dtype": dtype, "chunk_size": chunk if path != "transformers" else None,
                         "peak_extra_bytes": r["memory"]["peak_extra_bytes"] if r["memory"] else None,
                         **r})
    print(format_table(rows, mem_limit_gib), file=out or sys.stdout, flush=True)
    return rows


def format_table(rows, mem_limit_gib=None) -> str:
    cells = []
    for r in rows:
        base = next((b for b in rows if b["path"] == "transformers" and b["seq_len"] == r["seq_len"]
                     and b["peak_extra_bytes"] and not b["error"]), None)
        ok = r["error"] is None
        peak = f"{r['peak_extra_bytes'] / MIB:.1f}" if ok else r["error"]
        ratio = (f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.4f}"
                 if ok and base else "-")
        cells.append([r["path"], r["seq_len"], r["vocab"], r["hidden"], r["dtype"], r["chunk_size"] or "-", peak,
                      *((ratio, f"{r['loss']:.4f}", f"{r['seconds']:.1f}") if ok else ("-", "-", "-"))])
    lines = markdown_table(["path", "seq len", "vocab", "hidden", "dtype", "chunk", "peak extra MiB",
                            "vs transformers", "loss", "s"], cells, "lrrrlrrrrr")
    methods = sorted({r["memory"]["method"] for r in rows if r.get("memory")})
    lines += ["", "peak extra: peak RSS of the loss step (forward + backward, incl. the grads of "
              f"hidden and weight) above the RSS after the inputs were built ({', '.join(methods)}, "
              "reset via /proc/self/clear_refs); one spawned process per row, 1 torch thread"
              + (f"; address space limited to {mem_limit_gib} GiB above start-up" if mem_limit_gib else "")
              + "."]
    return "\n".join(lines)


def add_parser(benches) -> None:
    """Register ``seqpar bench loss`` on the subparsers object of ``seqpar bench``."""
    loss = benches.add_parser(
        "loss", help="peak memory of the LM-head loss step: transformers' default vs seqpar tiled",
        description=about(__doc__))
    loss.add_argument("--seq-len", default="4096,8192", help="comma-separated token counts, e.g. 4k,8k")
    loss.add_argument("--vocab", type=int, default=131072)
    loss.add_argument("--hidden", type=int, default=256)
    loss.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    loss.add_argument("--chunk-size", type=int, default=None, help="tokens per tile (default: ~256 MiB of logits)")
    loss.add_argument("--mem-limit-gib", type=float, default=None,
                      help="cap each process's memory so a path that does not fit fails cleanly")
    loss.set_defaults(func=_run_command)


def _run_command(args) -> int:
    lengths = parse_token_list(args.seq_len)
    run_loss_memory_bench(lengths, vocab=args.vocab, hidden=args.hidden, dtype=args.dtype,
                          chunk_size=args.chunk_size, mem_limit_gib=args.mem_limit_gib)
    return 0
