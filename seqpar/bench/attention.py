"""``seqpar bench attention``: time, bytes sent (measured vs theoretical) and peak memory
per rank of ring / Ulysses / hybrid attention forward+backward on W spawned processes,
against one process doing the whole sequence.

    seqpar bench attention --algo ring,ulysses,hybrid --world-size 4 --seq-len 4096

For each algorithm, W ranks are spawned (`seqpar.parallel.spawn.run_distributed`; gloo
on the CPU, or nccl with one GPU per rank for ``device="cuda"``). Every rank builds the
random q/k/v (and output gradient) of the FULL sequence from a fixed seed, keeps its
`shard` under the layout, and runs ``warmup + iters`` forward+backward passes of the
algorithm, each after a ``dist.barrier()`` and timed with ``time.perf_counter`` (on CUDA
after a synchronize). Reported:

- time: the median seconds per forward+backward over the timed iterations of each
  rank, then the maximum over ranks (the slowest rank sets the step time);
- traffic: bytes this rank sent, counted by `seqpar.parallel.count_comm` around the
  forward and around the backward of the first pass (the counters are filled by the
  communication calls themselves), next to `seqpar.parallel.volume.expected_comm`;
- peak memory: see `PeakMemory`.

The baseline (world size 1, unless disabled) is one spawned process running
`seqpar.ops.attention` on the whole sequence with the same shapes, dtype and mask; rows
report parallel time / single time and per-rank peak memory / single-process peak.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from ..commands import about
from ..errors import SeqparError, print_error
from ..ops import attention, registry, set_attention_kernel
from ..ops.registry import check_kernel_name
from ..parallel import (
    ALGORITHMS,
    count_comm,
    hybrid_attention,
    init_mesh,
    ring_attention,
    shard,
    ulysses_attention,
)
from ..parallel.layout import LAYOUTS
from ..parallel.spawn import DistributedRunError, run_distributed
from ..parallel.volume import expected_comm
from ..tables import markdown_table
from ..units import MIB

ALGOS = ALGORITHMS
SINGLE = "single"  # the world-size-1 baseline row
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchConfig:
    """One ``seqpar bench attention`` invocation (the CLI flags, validated by `validate`)."""

    algos: tuple = ("ring",)
    world_size: int = 2
    seq_len: int = 4096
    ulysses_size: int = 2  # hybrid only: ring size = world_size / ulysses_size
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    layout: str = "zigzag"
    causal: bool = True
    iters: int = 3
    warmup: int = 1
    baseline: bool = True
    device: str = "cpu"
    seed: int = 0
    timeout: float = 3600.0  # seconds, per spawned run
    kernels: tuple = ("auto",)  # local attention kernel orders to compare, side by side
    kv_heads_per_pass: tuple = (0,)  # ring: K/V heads per ring pass to compare; 0 = ring_attention's choice


def parse_algos(text) -> tuple:
    """'ring,ulysses' -> ('ring', 'ulysses'): order kept, duplicates dropped."""
    names = [text] if isinstance(text, str) else list(text)
    algos = []
    for part in ",".join(names).split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in ALGOS:
            raise SeqparError(
                f"unknown --algo {name!r}; choose from {', '.join(ALGOS)} (comma-separated to "
                f"compare several, e.g. --algo ring,ulysses).")
        if name not in algos:
            algos.append(name)
    if not algos:
        raise SeqparError(f"--algo is empty; give one or more of {', '.join(ALGOS)}, comma-separated.")
    return tuple(algos)


def ulysses_size_for(algo: str, cfg: BenchConfig) -> int:
    """Size of the Ulysses (all-to-all) group of `algo`; the rest of W is the ring."""
    return {"ring": 1, "ulysses": cfg.world_size, "hybrid": cfg.ulysses_size, SINGLE: 1}[algo]


def _check_heads(cfg: BenchConfig, u: int, what: str) -> None:
    """Ulysses over `u` ranks splits heads: q heads by u, K/V heads by u or copied."""
    if u <= 1:
        return
    if cfg.heads % u != 0:
        raise SeqparError(
            f"--heads {cfg.heads} is not divisible by the Ulysses size {u} ({what}); Ulysses "
            f"gives each rank heads/{u} heads, so choose --heads a multiple of {u} or a smaller "
            f"Ulysses size that divides {cfg.heads}.")
    if cfg.kv_heads % u != 0 and u % cfg.kv_heads != 0:
        raise SeqparError(
            f"--kv-heads {cfg.kv_heads} cannot be split over the Ulysses size {u} ({what}): one "
            f"must divide the other; choose --kv-heads a multiple or a divisor of {u}.")


def validate(cfg: BenchConfig) -> None:
    """Raise SeqparError (naming the flag to change) for any invalid configuration.

    Runs in the parent before anything is spawned."""
    parse_algos(cfg.algos)
    for kernel in cfg.kernels:
        check_kernel_name(kernel, "--kernel")
    for per_pass in cfg.kv_heads_per_pass:
        if per_pass < 0 or (per_pass and cfg.kv_heads % per_pass):
            raise SeqparError(f"--kv-heads-per-pass {per_pass} must divide --kv-heads {cfg.kv_heads} "
                              f"(or be 0: ring attention's own choice).")
    for flag, value, low in (("--world-size", cfg.world_size, 1), ("--seq-len", cfg.seq_len, 1),
                             ("--batch", cfg.batch, 1), ("--heads", cfg.heads, 1),
                             ("--kv-heads", cfg.kv_heads, 1), ("--head-dim", cfg.head_dim, 1),
                             ("--iters", cfg.iters, 1), ("--warmup", cfg.warmup, 0),
                             ("--ulysses-size", cfg.ulysses_size, 1)):
        if not isinstance(value, int) or value < low:
            raise SeqparError(f"{flag} must be an integer >= {low}; got {value!r}.")
    if cfg.timeout <= 0:
        raise SeqparError(f"--timeout must be > 0 seconds; got {cfg.timeout}.")
    if cfg.dtype not in DTYPES:
        raise SeqparError(f"--dtype {cfg.dtype!r} is not supported; choose {' or '.join(DTYPES)}.")
    if cfg.device not in DEVICES:
        raise SeqparError(f"--device {cfg.device!r} is not supported; choose {' or '.join(DEVICES)}.")
    if cfg.layout not in LAYOUTS:
        raise SeqparError(f"unknown --layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if cfg.heads % cfg.kv_heads != 0:
        raise SeqparError(
            f"--heads {cfg.heads} must be a multiple of --kv-heads {cfg.kv_heads} (GQA/MQA "
            f"shares each K/V head among heads/kv_heads query heads).")
    w, s = cfg.world_size, cfg.seq_len
    multiple = 2 * w if cfg.layout == "zigzag" else w
    if s % multiple != 0:
        need = f"2 x --world-size = {multiple}" if cfg.layout == "zigzag" else f"--world-size = {w}"
        fix = -(-s // multiple) * multiple
        raise SeqparError(
            f"--seq-len {s} is not divisible by {need}, which --layout {cfg.layout} needs; use a "
            f"multiple of {multiple} (e.g. --seq-len {fix}) or another --world-size.")
    for algo in parse_algos(cfg.algos):
        if algo == "ulysses":
            _check_heads(cfg, w, "--algo ulysses uses all --world-size ranks")
        elif algo == "hybrid":
            u = cfg.ulysses_size
            if w % u != 0:
                divisors = [d for d in range(1, w + 1) if w % d == 0]
                raise SeqparError(
                    f"--world-size {w} is not divisible by --ulysses-size {u}; hybrid runs "
                    f"ulysses_size x ring_size ranks, so choose --ulysses-size from {divisors}.")
            _check_heads(cfg, u, "--ulysses-size of --algo hybrid")
            if cfg.layout == "stripe" and 1 < u < w:
                raise SeqparError(
                    "--algo hybrid does not compose with --layout stripe; use --layout zigzag "
                    "or contiguous.")
    if cfg.device == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < w:
            raise SeqparError(
                f"--device cuda needs one GPU per rank: --world-size {w} but {have} visible; "
                f"lower --world-size or use --device cpu.")


# ----------------------------------------------------------------------------- memory

def _rss_bytes() -> int:
    """Current resident set size of this process (/proc/self/statm, field 2)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    """Peak RSS of this process's address space (VmHWM of /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak extra memory of the benchmarked work on one rank.

    CUDA: ``torch.cuda.memory_allocated()`` at `start` is the baseline;
    `reset_peak` calls ``torch.cuda.reset_peak_memory_stats()``; the result is
    ``torch.cuda.max_memory_allocated() - baseline`` (bytes of tensors, not the
    caching allocator's reserve).

    CPU: the baseline is the current RSS read from ``/proc/self/statm`` right after the
    process group (and mesh) are set up and BEFORE the inputs are allocated; the result is
    the peak RSS afterwards minus that baseline, so it includes this rank's input shards,
    activations, gradients and communication buffers.

    The peak RSS is read as ``VmHWM`` from ``/proc/self/status``, not from
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: in a process started by spawn
    (fork + exec), Linux carries the forking parent's RSS high-water mark into
    ``ru_maxrss`` (checked: a parent holding 1.5 GB gives a fresh child that
    ru_maxrss at start, hiding all of the child's own work), while ``VmHWM`` belongs
    to the child's own address space. ``ru_maxrss`` (KiB on Linux) is the fallback
    where ``/proc/self/status`` has no VmHWM, and is reported alongside.

    `reset_peak` (after the full-sequence tensors each rank builds only to cut its shard
    have been freed) writes ``5`` to ``/proc/self/clear_refs``, which resets VmHWM to the
    current RSS, so that benchmark-only allocation is not counted. Where the kernel
    refuses, `peak_reset` is False and the peak may include it.
    """

    def __init__(self, device):
        self.device = device
        self.baseline = 0
        self.peak_reset = False
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.baseline = _rss_bytes()
            self.method = "VmHWM" if _hwm_bytes() is not None else "ru_maxrss"

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_reset = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.peak_reset = self.method == "VmHWM"
        except OSError:
            self.peak_reset = False

    def result(self) -> dict:
        """Peak extra bytes (and the raw readings, for the JSON)."""
        out = {"baseline_bytes": self.baseline, "method": self.method,
               "peak_reset": self.peak_reset}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["ru_maxrss_bytes"] = maxrss
            hwm = _hwm_bytes()
            out["vmhwm_bytes"] = hwm
            peak = hwm if self.method == "VmHWM" and hwm is not None else maxrss
        out["peak_bytes"] = peak
        out["now_bytes"] = _rss_bytes() if self.device.type != "cuda" else None
        if self.device.type == "cuda":
            out["now_bytes"] = torch.cuda.memory_allocated(self.device)
        out["peak_extra_bytes"] = max(0, peak - self.baseline)
        return out


# ----------------------------------------------------------------------------- ranks

def _attention_step(algo: str, cfg, world: int, per_pass: int = 0):
    """(mesh or None, forward function of (q, k, v)) for one algorithm."""
    causal, layout = cfg.causal, cfg.layout
    if algo == SINGLE:
        return None, lambda q, k, v: attention(q, k, v, causal=causal)[0]
    mesh = init_mesh(world, ulysses_size_for(algo, cfg))
    if algo == "ring":
        return mesh, lambda q, k, v: ring_attention(q, k, v, mesh.sp_group, causal=causal, layout=layout,
                                                    kv_heads_per_pass=per_pass or None)
    if algo == "ulysses":
        return mesh, lambda q, k, v: ulysses_attention(q, k, v, mesh.sp_group, causal=causal, layout=layout)
    return mesh, lambda q, k, v: hybrid_attention(q, k, v, mesh, causal=causal, layout=layout)


def _timed_passes(step_fwd, tensors, cfg, sync):
    """Forward+backward `warmup + iters` times; (times of the timed ones, comm of the first)."""
    q, k, v, dout = tensors
    times, comm = [], {}
    for i in range(cfg.warmup + cfg.iters):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        if i == 0:  # counting is a Counter update per call: same cost as the other passes
            with count_comm() as fwd:
                out = step_fwd(q, k, v)
            with count_comm() as bwd:
                out.backward(dout)
            comm = {"fwd": {"calls": dict(fwd.calls), "bytes_sent": dict(fwd.bytes_sent)},
                    "bwd": {"calls": dict(bwd.calls), "bytes_sent": dict(bwd.bytes_sent)}}
        else:
            out = step_fwd(q, k, v)
            out.backward(dout)
        sync()
        elapsed = time.perf_counter() - t0
        del out
        if i >= cfg.warmup:
            times.append(elapsed)
    return times, comm


def _rank_work(cfg_dict: dict, algo: str, kernel: str = "auto", per_pass: int = 0) -> dict:
    """One rank of one run (spawned by run_distributed; module-level so spawn can pickle it)."""
    cfg = BenchConfig(**cfg_dict)
    set_attention_kernel(kernel)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda"
              else torch.device("cpu"))
    dtype = getattr(torch, cfg.dtype)
    layout = cfg.layout

    mesh, step_fwd = _attention_step(algo, cfg, world, per_pass)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Prime: one tiny, untimed, uncounted pass, so one-time process costs (lazy imports,
    # thread pools, allocator arenas: ~40 MiB RSS on CPU) are not charged to the work.
    tiny = (2 if layout == "zigzag" else 1) * world
    prime = [torch.randn(cfg.batch, tiny // world if mesh is not None else tiny, h, cfg.head_dim,
                         device=device, dtype=dtype, requires_grad=True)
             for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads)]
    out = step_fwd(*prime)
    out.backward(torch.ones_like(out))  # as the timed passes call it (the first such call costs RSS)
    del prime, out
    sync()

    mem = PeakMemory(device)
    mem.start()  # process group and mesh exist; no input allocated yet

    gen = torch.Generator().manual_seed(cfg.seed)
    q_shape = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    kv_shape = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    full = [torch.randn(shape, generator=gen) for shape in (q_shape, kv_shape, kv_shape, q_shape)]
    if mesh is not None:
        full = [shard(t, mesh.sp_group, dim=1, layout=layout) for t in full]
    q, k, v, dout = (t.to(device=device, dtype=dtype).contiguous() for t in full)
    del full
    for t in (q, k, v):
        t.requires_grad_(True)
    mem.reset_peak()

    times, comm = _timed_passes(step_fwd, (q, k, v, dout), cfg, sync)
    memory = mem.result()
    return {"rank": rank, "times_s": times, "median_s": statistics.median(times),
            "comm": comm, "memory": memory, "backend": served_text(registry.served_summary(device.type)),
            "local_shape": list(q.shape)}


# ----------------------------------------------------------------------------- runs

def _theory(algo: str, cfg: BenchConfig, per_pass: int = 0) -> dict:
    if algo == SINGLE:
        return {"fwd": {"calls": {}, "bytes_sent": {}}, "bwd": {"calls": {}, "bytes_sent": {}},
                "total_bytes": 0}
    fwd, bwd = expected_comm(
        algo, seq_len=cfg.seq_len, batch=cfg.batch, q_heads=cfg.heads, kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, elem_bytes=2 if cfg.dtype == "bfloat16" else 4,
        sp_size=cfg.world_size, ulysses_size=ulysses_size_for(algo, cfg), kv_heads_per_pass=per_pass or None)
    return {"fwd": {"calls": dict(fwd.calls), "bytes_sent": dict(fwd.bytes_sent)},
            "bwd": {"calls": dict(bwd.calls), "bytes_sent": dict(bwd.bytes_sent)},
            "total_bytes": fwd.total_bytes + bwd.total_bytes}


def algo_label(algo: str, cfg: BenchConfig, per_pass: int = 0) -> str:
    if algo == "hybrid":
        u = cfg.ulysses_size
        return f"hybrid U{u}xR{cfg.world_size // u}"
    return f"{algo} ({per_pass} kv heads/pass)" if per_pass else algo


def served_text(served: dict) -> str:
    """'causal: flash; documents: seqpar': which kernel served each block kind."""
    return "; ".join(f"{kind}: {'/'.join(names)}" for kind, names in served.items()) or "-"


def _summarize(algo: str, cfg: BenchConfig, ranks: list, wall_s: float, per_pass: int = 0) -> dict:
    world = 1 if algo == SINGLE else cfg.world_size
    sent = [sum(r["comm"]["fwd"]["bytes_sent"].values()) + sum(r["comm"]["bwd"]["bytes_sent"].values())
            for r in ranks]
    theory = _theory(algo, cfg, per_pass)
    peaks = [r["memory"]["peak_extra_bytes"] for r in ranks]
    u = ulysses_size_for(algo, cfg)
    return {
        "algo": algo, "label": algo_label(algo, cfg, per_pass) if algo != SINGLE else "single (W=1)",
        "kv_heads_per_pass": per_pass or None,
        "world_size": world, "ulysses_size": u, "ring_size": world // u,
        "layout": cfg.layout if algo != SINGLE else None, "seq_len": cfg.seq_len,
        "local_seq_len": ranks[0]["local_shape"][1],
        "time_s": max(r["median_s"] for r in ranks),
        "time_median_per_rank_s": [r["median_s"] for r in ranks],
        "iter_times_per_rank_s": [r["times_s"] for r in ranks],
        "bytes_sent_per_rank": max(sent), "bytes_sent_by_rank": sent,
        "comm_by_rank": [r["comm"] for r in ranks],
        "theoretical": theory, "bytes_theoretical_per_rank": theory["total_bytes"],
        "measured_over_theoretical": (max(sent) / theory["total_bytes"]
                                      if theory["total_bytes"] else None),
        "peak_mem_bytes_per_rank": max(peaks), "peak_mem_bytes_by_rank": peaks,
        "memory_by_rank": [r["memory"] for r in ranks],
        "attention_backend": ranks[0]["backend"], "wall_s": wall_s,
    }


def _device_text(cfg: BenchConfig) -> str:
    if cfg.device == "cuda":
        return f"CUDA nccl, {cfg.world_size} x {torch.cuda.get_device_name(0)}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return f"CPU gloo, {cores} cores, 1 torch thread per rank"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: BenchConfig, log=_log) -> dict:
    """Validate, run every algorithm (and the baseline), return all numbers."""
    cfg = replace(cfg, algos=parse_algos(cfg.algos))
    validate(cfg)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    started = datetime.datetime.now().astimezone()
    rows = []
    jobs = [(algo, kernel, per_pass) for algo in ([SINGLE] if cfg.baseline else []) + list(cfg.algos)
            for kernel in cfg.kernels for per_pass in (cfg.kv_heads_per_pass if algo == "ring" else (0,))]
    for algo, kernel, per_pass in jobs:
        world = 1 if algo == SINGLE else cfg.world_size
        name = (f"{algo_label(algo, cfg, per_pass) if algo != SINGLE else SINGLE} W={world} S={cfg.seq_len} "
                f"kernel={kernel}")
        log(f"[bench] {name}: running...")
        t0 = time.monotonic()
        ranks = run_distributed(_rank_work, world, asdict(cfg), algo, kernel, per_pass, timeout=cfg.timeout,
                                backend=backend)
        row = {**_summarize(algo, cfg, ranks, time.monotonic() - t0, per_pass), "kernel": kernel}
        log(f"[bench] {name}: {row['time_s']:.4f} s per fwd+bwd (run took {row['wall_s']:.1f} s)")
        rows.append(row)
    _add_ratios(rows, cfg.kernels[0])
    return {
        "attention_backend": rows[0]["attention_backend"] if rows else "-",
        "torch_version": torch.__version__, "device": _device_text(cfg),
        "date": started.isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "algos": list(cfg.algos), "kernels": list(cfg.kernels),
                   "kv_heads_per_pass": list(cfg.kv_heads_per_pass)},
        "rows": rows,
    }


def _add_ratios(rows: list, first_kernel: str) -> None:
    """Time and memory vs the W=1 run of the same kernel; time vs the first kernel's row."""
    def find(algo, kernel, per_pass=None):
        return next((r for r in rows if r["algo"] == algo and r["kernel"] == kernel
                     and r["kv_heads_per_pass"] == per_pass), None)
    for row in rows:
        single = find(SINGLE, row["kernel"])
        first = find(row["algo"], first_kernel, row["kv_heads_per_pass"])
        row["time_ratio_vs_single"] = row["time_s"] / single["time_s"] if single else None
        row["mem_ratio_vs_single"] = (row["peak_mem_bytes_per_rank"] / single["peak_mem_bytes_per_rank"]
                                      if single and single["peak_mem_bytes_per_rank"] else None)
        row["time_ratio_vs_first_kernel"] = row["time_s"] / first["time_s"] if first else None


# ----------------------------------------------------------------------------- output

def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_report(result: dict) -> str:
    """Header line, configuration line, markdown table, and how the numbers were taken."""
    cfg = result["config"]
    head = (f"seqpar bench attention | kernels: {','.join(cfg['kernels'])} | "
            f"torch {result['torch_version']} | {result['device']} | {result['date']}")
    setup = (f"batch {cfg['batch']}, heads {cfg['heads']}, kv heads {cfg['kv_heads']}, head dim "
             f"{cfg['head_dim']}, {cfg['dtype']}, {'causal' if cfg['causal'] else 'not causal'}, "
             f"{cfg['iters']} timed iters after {cfg['warmup']} warmup")
    cols = ["algo", "W", "layout", "seq len", "kernel", "s / fwd+bwd", "time vs W=1",
            f"time vs kernel {result['config']['kernels'][0]}",
            "sent/rank MiB (measured)", "theoretical MiB", "measured/theory",
            "peak mem/rank MiB", "mem vs W=1"]
    table = []
    for r in result["rows"]:
        table.append([r["label"], r["world_size"], r["layout"] or "-", r["seq_len"], r["kernel"],
                      f"{r['time_s']:.4f}", _fmt(r["time_ratio_vs_single"], ".2f"),
                      _fmt(r["time_ratio_vs_first_kernel"], ".2f"),
                      f"{r['bytes_sent_per_rank'] / MIB:.2f}",
                      f"{r['bytes_theoretical_per_rank'] / MIB:.2f}",
                      _fmt(r["measured_over_theoretical"], ".3f"),
                      f"{r['peak_mem_bytes_per_rank'] / MIB:.1f}", _fmt(r["mem_ratio_vs_single"], ".2f")])
    lines = [head, setup, "", *markdown_table(cols, table, "lllrl" + "r" * (len(cols) - 5))]
    lines += ["", "kernels that served each block kind (rank 0):"]
    lines += [f"- {r['label']} kernel={r['kernel']}: {r['attention_backend']}" for r in result["rows"]]
    methods = sorted({m["method"] for r in result["rows"] for m in r["memory_by_rank"]})
    unreset = any(not m["peak_reset"] for r in result["rows"] for m in r["memory_by_rank"])
    lines += ["", "time: median over timed iters per rank, max over ranks. sent: bytes one rank "
              "sends in one forward + one backward (max over ranks). peak mem: peak above the "
              f"memory before inputs were allocated, max over ranks ({', '.join(methods)})"
              + ("; peak NOT reset after the full-sequence input build" if unreset else "") + "."]
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def main(cfg: BenchConfig, json_path: str | None = None, out=None) -> dict:
    """Run, print the report to `out` (stdout), write JSON if asked; return the numbers."""
    result = run(cfg)
    print(format_report(result), file=out or sys.stdout, flush=True)
    if json_path:
        write_json(result, json_path)
        _log(f"[bench] wrote {json_path}")
    return result


def add_parser(benches) -> None:
    """Register ``seqpar bench attention`` on the subparsers object of ``seqpar bench``."""
    p = benches.add_parser(
        "attention", help="ring / Ulysses / hybrid attention vs one process",
        description=about(__doc__))
    p.add_argument("--algo", default="ring",
                   help="ring, ulysses, hybrid, or several comma-separated (default: ring)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks W")
    p.add_argument("--seq-len", type=int, required=True, help="total sequence length S")
    p.add_argument("--ulysses-size", type=int, default=2,
                   help="hybrid only: Ulysses group size U (ring size W/U; default 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA/MQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--layout", choices=("zigzag", "contiguous", "stripe"), default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false",
                   help="full (bidirectional) attention instead of causal")
    p.add_argument("--iters", type=int, default=3, help="timed forward+backward passes")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before them")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the world-size-1 run (and the ratios against it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo processes; cuda: nccl, one GPU per rank (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed for each spawned run (default: 3600)")
    p.add_argument("--kernel", default="auto",
                   help="local attention kernel order(s) to compare side by side, comma-separated: "
                        "auto, flash, cudnn, efficient, flash-attn, seqpar, torch (default: auto)")
    p.add_argument("--kv-heads-per-pass", default="0",
                   help="ring: K/V heads per pass around the ring, comma-separated to compare side by "
                        "side; 0 = ring attention's own choice (default)")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.set_defaults(func=_run_command)


def _int_list(text: str, flag: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SeqparError(f"{flag} takes whole numbers, comma-separated (e.g. 0,1), not {text!r}.") from None


def _run_command(args) -> int:
    cfg = BenchConfig(
        algos=parse_algos(args.algo), world_size=args.world_size,
        seq_len=args.seq_len, ulysses_size=args.ulysses_size, batch=args.batch,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
        layout=args.layout, causal=args.causal, iters=args.iters, warmup=args.warmup,
        baseline=args.baseline, device=args.device, seed=args.seed, timeout=args.timeout,
        kernels=tuple(k.strip() for k in args.kernel.split(",") if k.strip()),
        kv_heads_per_pass=_int_list(args.kv_heads_per_pass, "--kv-heads-per-pass"))
    try:
        main(cfg, json_path=args.json)
    except DistributedRunError as e:
        print_error(f"a benchmark rank failed:\n{e}")
        return 1
    return 0
