"""``seqpar bench kernels``: seqpar's local kernels next to the strongest plain-PyTorch
baselines, in one process and one run: rope GB/s (vs a device copy, transformers' eager
rope, and it under torch.compile) and causal attention TFLOP/s forward and
forward+backward (vs SDPA flash/cuDNN on CUDA, SDPA and the pure-torch fallback on CPU),
each path checked against a float32 reference before it is timed.

    seqpar bench kernels                        # GPU: bf16, head_dim 128, seq 4K..64K
    seqpar bench kernels --device cpu --no-compile

- rope: `seqpar.ops.apply_rope` (cos/sin tables) and `apply_rope_from_positions` against a
  device-to-device copy of the same q+k bytes (the bandwidth ceiling), transformers' eager
  `apply_rotary_pos_emb`, and that eager function under `torch.compile`. GB/s counts the
  op's minimal traffic: read q,k + write q,k + read the tables (or positions); "vs copy"
  divides by the copy's GB/s. Target on a GPU: >= 0.80.
- attention: `seqpar.ops.attention`, causal, forward and forward+backward, against
  `F.scaled_dot_product_attention` with its flash and cuDNN backends (CUDA) or its default
  dispatch plus seqpar's pure-torch fallback (CPU). FLOPs follow flash-attention's
  convention: forward 4*B*H*S*S*D / 2 (causal), forward+backward 3.5x that. "vs baseline"
  divides by SDPA flash (CUDA) or SDPA (CPU). Target on a GPU: >= 1.0.

Before a path is timed it runs once and is compared with a float32 reference (the eager
rope on float32 copies; SDPA on float32 copies with K/V expanded), so a wrong kernel
cannot post a good number; that call also absorbs torch.compile's compilation. Times are
the median of `iters` runs after `warmup`: CUDA events on a GPU, perf_counter on the CPU.
A path that cannot run here (a backend missing, no C compiler for inductor) gives a row
with its error instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..commands import about
from ..errors import SeqparError
from ..ops import (
    apply_rope,
    apply_rope_from_positions,
    attention,
    attention_backend,
    registry,
)
from ..ops.attention import run_backward, run_forward
from ..ops.masks import CAUSAL, MaskKind
from ..tables import markdown_table
from ..units import parse_tokens

OPS = ("rope", "attention")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_THETA = 10000.0  # Llama's default base; the frequencies do not change the traffic
COPY, HF_EAGER, HF_COMPILE = "copy (same bytes)", "transformers eager", "transformers eager + torch.compile"
SEQPAR_ROPE, SEQPAR_ROPE_POS = "seqpar apply_rope", "seqpar apply_rope_from_positions"
SEQPAR_ATTN = "seqpar attention (auto)"
KERNEL = "kernel "  # + a registry backend name: that kernel alone, on the same block
SDPA, SDPA_FLASH, SDPA_CUDNN = "sdpa (default)", "sdpa flash", "sdpa cudnn"
DEFAULTS = {  # what the flags left unset become, per device
    "cuda": dict(seq_lens="4096,8192,16384,32768,65536", heads=16, head_dim=128,
                 dtype="bfloat16", iters=20, warmup=5),
    "cpu": dict(seq_lens="1024,2048", heads=8, head_dim=64, dtype="float32", iters=10, warmup=2),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config

def resolve_config(device=None, seq_lens=None, batch=1, heads=None, kv_heads=None, head_dim=None,
                   dtype=None, iters=None, warmup=None, ops=OPS, compile=True, seed=0) -> dict:
    """Fill per-device defaults and validate; raise SeqparError naming the flag to change."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEFAULTS:
        raise SeqparError(f"--device {device!r} is not supported; choose cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) sees no GPU")
        raise SeqparError(f"--device cuda asked for, but {why} (torch {torch.__version__}); run on a "
                          "machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu.")
    given = dict(seq_lens=seq_lens, heads=heads, head_dim=head_dim, dtype=dtype, iters=iters, warmup=warmup)
    cfg = {key: DEFAULTS[device][key] if value is None else value for key, value in given.items()}
    text = cfg["seq_lens"]
    items = [t for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    cfg.update(device=device, seq_lens=[parse_tokens(t) for t in items], batch=batch,
               kv_heads=cfg["heads"] if kv_heads is None else kv_heads, compile=bool(compile), seed=seed)
    op_list = ops.split(",") if isinstance(ops, str) else list(ops)
    cfg["ops"] = [o.strip() for o in op_list if o.strip()]
    if not cfg["seq_lens"]:
        raise SeqparError("--seq-len is empty; give comma-separated lengths, e.g. --seq-len 4k,8k.")
    if not cfg["ops"] or any(o not in OPS for o in cfg["ops"]):
        raise SeqparError(f"--ops {ops!r}: choose one or more of {','.join(OPS)}, comma-separated.")
    if cfg["dtype"] not in DTYPES:
        raise SeqparError(f"--dtype {cfg['dtype']!r} is not supported; choose one of {', '.join(DTYPES)}.")
    for flag, key, low in (("--batch", "batch", 1), ("--heads", "heads", 1), ("--kv-heads", "kv_heads", 1),
                           ("--head-dim", "head_dim", 2), ("--iters", "iters", 1), ("--warmup", "warmup", 0)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            raise SeqparError(f"{flag} must be an integer >= {low}; got {cfg[key]!r}.")
    if cfg["heads"] % cfg["kv_heads"]:
        raise SeqparError(f"--heads {cfg['heads']} must be a multiple of --kv-heads {cfg['kv_heads']} (GQA).")
    if cfg["head_dim"] % 2:
        raise SeqparError(f"--head-dim {cfg['head_dim']} must be even: rope rotates pairs of dims.")
    return cfg


# ----------------------------------------------------------------------------- measuring

def _timed(fn, device, iters: int, warmup: int) -> list[float]:
    """Seconds per call of fn, `iters` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        # Events time the GPU stream itself; one synchronize at the end, not one per call.
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(iters)]
        for start, end in marks:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in marks]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _max_diff(got, want) -> float:
    pairs = zip(got, want) if isinstance(got, (tuple, list)) else [(got, want)]
    return max(float((g.float() - w.float()).abs().max()) for g, w in pairs)


def _measure(cfg, device, fn, reference, context=contextlib.nullcontext) -> dict:
    """Check fn once against `reference` (None: no check), then time it; errors become a row."""
    try:
        with context():
            result = fn()
            diff = _max_diff(result, reference) if reference is not None else None
            del result
            times = _timed(fn, device, cfg["iters"], cfg["warmup"])
    except Exception as exc:  # one path failing (no kernel, no compiler) must not end the run
        if device.type == "cuda":
            with contextlib.suppress(Exception):  # a sticky CUDA error is reported below anyway
                torch.cuda.synchronize(device)
        lines = str(exc).strip().splitlines()
        return {"time_s": None, "times_s": [], "max_abs_diff": None,
                "error": f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"}
    return {"time_s": statistics.median(times), "times_s": times, "max_abs_diff": diff, "error": None}


def _inputs(cfg, device, seq_len, *head_counts):
    g = torch.Generator().manual_seed(cfg["seed"] + seq_len)  # drawn on the CPU: same numbers anywhere
    return [torch.randn(cfg["batch"], seq_len, h, cfg["head_dim"], generator=g)
            .to(device=device, dtype=getattr(torch, cfg["dtype"])) for h in head_counts]


def _hf_rope_bshd(q, k, cos, sin):
    """transformers' eager rope on bshd tensors: cos/sin [1, s, d] broadcast over dim 2."""
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


def _compile_hf_rope():
    """The eager rope under torch.compile, one static-shape graph per length (compiled lazily,
    on the untimed check call); a failure shows up in the row, not as a crash."""
    try:
        return torch.compile(_hf_rope_bshd, dynamic=False, fullgraph=True)
    except Exception as exc:
        reason = f"torch.compile unavailable: {type(exc).__name__}: {exc}"

        def unavailable(*args):
            raise RuntimeError(reason)
        return unavailable


def _rope_rows(cfg, device, s, compiled_hf):
    q, k = _inputs(cfg, device, s, cfg["heads"], cfg["kv_heads"])
    d = cfg["head_dim"]
    positions = torch.arange(s, device=device)
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    emb = torch.cat([positions[:, None].float() * inv_freq] * 2, dim=-1)  # as transformers builds it
    cos32, sin32 = emb.cos()[None], emb.sin()[None]
    cos, sin = cos32.to(q.dtype), sin32.to(q.dtype)
    ref = _hf_rope_bshd(q.float(), k.float(), cos32, sin32)
    qk, tables = q.nbytes + k.nbytes, cos.nbytes + sin.nbytes
    src = torch.empty(qk, dtype=torch.uint8, device=device)  # one flat buffer: copy at its best
    dst = torch.empty_like(src)
    paths = [(COPY, lambda: dst.copy_(src), 2 * qk, None),
             (HF_EAGER, lambda: _hf_rope_bshd(q, k, cos, sin), 2 * qk + tables, ref)]
    if compiled_hf is not None:
        paths.append((HF_COMPILE, lambda: compiled_hf(q, k, cos, sin), 2 * qk + tables, ref))
    paths += [(SEQPAR_ROPE, lambda: apply_rope(q, k, cos[0], sin[0]), 2 * qk + tables, ref),
              (SEQPAR_ROPE_POS, lambda: apply_rope_from_positions(q, k, positions, inv_freq),
               2 * qk + positions.nbytes + inv_freq.nbytes, ref)]
    rows = [{"op": "rope", "seq_len": s, "path": name, "bytes": nbytes,
             **_measure(cfg, device, fn, r)} for name, fn, nbytes, r in paths]
    copy = rows[0]["time_s"] and rows[0]["bytes"] / rows[0]["time_s"]
    for row in rows:
        row["gb_per_s"] = row["bytes"] / row["time_s"] / 1e9 if row["time_s"] else None
        row["vs_copy"] = row["bytes"] / row["time_s"] / copy if row["time_s"] and copy else None
    return rows


def _attention_rows(cfg, device, s):
    q, k, v, dout = _inputs(cfg, device, s, cfg["heads"], cfg["kv_heads"], cfg["kv_heads"], cfg["heads"])
    for t in (q, k, v):
        t.requires_grad_(True)
    gqa = cfg["heads"] != cfg["kv_heads"]

    def sdpa(q, k, v, **kw):  # bshd -> bhsd views: SDPA's flash kernels read this layout as is
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, **kw)
        return out.transpose(1, 2)

    # Reference: SDPA on float32 copies, K/V expanded so no backend needs GQA support.
    # If it does not fit (float32 at the longest lengths), the rows go unchecked ("-").
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    rep = cfg["heads"] // cfg["kv_heads"]
    try:
        out_ref = sdpa(qr, kr.repeat_interleave(rep, 2), vr.repeat_interleave(rep, 2))
        grads_ref = torch.autograd.grad(out_ref, (qr, kr, vr), dout.float())
        out_ref = out_ref.detach()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        _log(f"[bench kernels] S={s}: float32 reference failed ({type(err).__name__}); rows unchecked")
        out_ref = grads_ref = None
    del qr, kr, vr

    def with_grads(fwd):
        return lambda: torch.autograd.grad(fwd(), (q, k, v), dout)

    def no_grad(fwd):  # forward work only: no autograd graph, nothing saved for backward
        def run():
            with torch.no_grad():
                return fwd()
        return run

    kw = {"enable_gqa": True} if gqa else {}
    paths = [(SEQPAR_ATTN, lambda: attention(q, k, v, causal=True)[0], None, None)]
    paths += _kernel_paths(q, k, v, dout, device)
    if device.type == "cuda":
        for name, backend in ((SDPA_FLASH, "FLASH_ATTENTION"), (SDPA_CUDNN, "CUDNN_ATTENTION")):
            paths.append((name, lambda: sdpa(q, k, v, **kw), None, getattr(SDPBackend, backend)))
    else:
        paths.append((SDPA, lambda: sdpa(q, k, v, **kw), None, None))
    base = SDPA_FLASH if device.type == "cuda" else SDPA
    flops = 4 * cfg["batch"] * cfg["heads"] * s * s * cfg["head_dim"] / 2  # causal: half the scores
    rows = []
    for mode, mode_flops, ref in (("fwd", flops, out_ref), ("fwd+bwd", 3.5 * flops, grads_ref)):
        for name, fwd, fwd_bwd, backend in paths:
            context = (lambda b=backend: sdpa_kernel(b)) if backend is not None else contextlib.nullcontext
            fn = no_grad(fwd) if mode == "fwd" else fwd_bwd or with_grads(fwd)
            rows.append({"op": "attention", "seq_len": s, "pass": mode, "path": name, "flops": mode_flops,
                         "baseline": base, **_measure(cfg, device, fn, ref, context)})
        base_row = next(r for r in rows if r["pass"] == mode and r["path"] == base)
        for row in rows:
            if row["pass"] == mode:
                row["tflop_per_s"] = row["flops"] / row["time_s"] / 1e12 if row["time_s"] else None
                row["vs_baseline"] = (base_row["time_s"] / row["time_s"]
                                      if row["time_s"] and base_row["time_s"] else None)
    return rows


def _kernel_paths(q, k, v, dout, device) -> list:
    """One path per self-tested registry kernel that serves a causal block here."""
    kind, mask, head_dim = MaskKind(CAUSAL), {"causal": True}, q.shape[-1]
    paths = []
    for backend in registry.order(device.type):
        if not (backend.serves(device, q.dtype, head_dim, CAUSAL) and backend.available(device, head_dim)
                and registry.verify(backend, device, q.dtype, head_dim).ok):
            continue

        def fwd(b=backend):
            return run_forward(b, q, k, v, None, mask, kind)[0]

        @torch.no_grad()
        def fwd_bwd(b=backend):
            out, lse = run_forward(b, q, k, v, None, mask, kind)
            return run_backward(b, dout, q, k, v, out, lse, None, None, mask, kind)
        paths.append((KERNEL + backend.name, fwd, fwd_bwd, None))
    return paths


# ----------------------------------------------------------------------------- run + report

def _device_text(device) -> str:
    if device.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU {platform.processor() or platform.machine()}, {cores} cores, "
            f"{torch.get_num_threads()} torch threads")


def run_kernel_bench(*, json_path=None, out=None, log=_log, **options) -> list[dict]:
    """Measure every op, path and length (options: see `resolve_config`), print the report
    to `out` (stdout), write JSON if asked, and return the rows."""
    cfg = resolve_config(**options)
    device = torch.device(cfg["device"])
    started = datetime.datetime.now().astimezone()
    # Runs the kernels' self-tests (and builds the compiled ops) now, before anything is timed.
    backend = attention_backend(device, getattr(torch, cfg["dtype"]), cfg["head_dim"])
    compiled_hf = _compile_hf_rope() if cfg["compile"] and "rope" in cfg["ops"] else None
    rows = []
    for s in cfg["seq_lens"]:
        for op in cfg["ops"]:
            log(f"[bench kernels] {op} S={s}: running...")
            new = _rope_rows(cfg, device, s, compiled_hf) if op == "rope" else _attention_rows(cfg, device, s)
            for r in new:
                if r["error"]:
                    log(f"[bench kernels] {op} S={s} {r['path']}: {r['error']}")
            rows += new
    meta = {"attention_backend": backend, "torch_version": torch.__version__,
            "device": _device_text(device), "date": started.isoformat(timespec="seconds"), "config": cfg}
    print(format_report(meta, rows), file=out or sys.stdout, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)
            f.write("\n")
        log(f"[bench kernels] wrote {json_path}")
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_report(meta: dict, rows: list[dict]) -> str:
    """Header, configuration, one markdown table per op, and how the numbers were taken."""
    cfg = meta["config"]
    lines = [f"seqpar bench kernels | attention backend: {meta['attention_backend']} | torch "
             f"{meta['torch_version']} | {meta['device']} | {meta['date']}",
             f"batch {cfg['batch']}, heads {cfg['heads']}, kv heads {cfg['kv_heads']}, head dim "
             f"{cfg['head_dim']}, {cfg['dtype']}; median of {cfg['iters']} timed runs after "
             f"{cfg['warmup']} warmup ({'CUDA events' if cfg['device'] == 'cuda' else 'perf_counter'})"]

    def time_cell(r):  # a failed path shows its error where its time would be
        return f"{r['time_s'] * 1e3:.3f}" if r["error"] is None else r["error"]

    def rope_cells(r):
        return [str(r["seq_len"]), r["path"], f"{r['bytes'] / (1 << 20):.2f}", time_cell(r),
                _fmt(r["gb_per_s"], ".2f"), _fmt(r["vs_copy"], ".3f"), _fmt(r["max_abs_diff"], ".2e")]

    def attention_cells(r):
        return [str(r["seq_len"]), r["pass"], r["path"], f"{r['flops'] / 1e12:.4g}", time_cell(r),
                _fmt(r["tflop_per_s"], ".3f"), _fmt(r["vs_baseline"], ".3f"), _fmt(r["max_abs_diff"], ".2e")]

    rope = [r for r in rows if r["op"] == "rope"]
    if rope:
        lines += ["", "rope (bytes: read q,k + write q,k + read cos/sin or positions)", ""]
        lines += markdown_table(["seq len", "path", "MiB moved", "ms", "GB/s", "vs copy", "max abs diff"],
                                map(rope_cells, rope), "rlrrrrr")
    attn = [r for r in rows if r["op"] == "attention"]
    if attn:
        lines += ["", f"attention, causal (FLOPs: fwd 4*B*H*S*S*D/2, fwd+bwd 3.5x fwd; baseline "
                  f"{attn[0]['baseline']}; diff: output for fwd, dq/dk/dv for fwd+bwd)", ""]
        lines += markdown_table(["seq len", "pass", "path", "TFLOP", "ms", "TFLOP/s", "vs baseline", "max abs diff"],
                                map(attention_cells, attn), "rllrrrrr")
    lines += ["", "max abs diff: against a float32 reference (transformers' eager rope / SDPA on float32 "
              "copies).",
              "Targets on a GPU: seqpar rope >= 0.80 of copy; seqpar attention >= 1.0 x SDPA flash. "
              "'kernel X' rows run one registry kernel alone; 'seqpar attention (auto)' is what training uses."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def add_parser(benches) -> None:
    """Register ``seqpar bench kernels`` on the subparsers object of ``seqpar bench``."""
    p = benches.add_parser(
        "kernels", help="seqpar rope and attention kernels vs copy, transformers, torch.compile, SDPA",
        description=about(__doc__))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--seq-len", default=None,
                   help="comma-separated lengths, e.g. 4k,8k (default: cuda 4096..65536, cpu 1024,2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads (default: cuda 16, cpu 8)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=None, help="default: cuda 128, cpu 64")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: cuda bfloat16, cpu float32")
    p.add_argument("--iters", type=int, default=None, help="timed runs per path (default: cuda 20, cpu 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs before them (default: cuda 5, cpu 2)")
    p.add_argument("--ops", default=",".join(OPS), help="rope, attention or both (default: rope,attention)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rope row (inductor compiles C++ on the CPU: slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    run_kernel_bench(device=args.device, seq_lens=args.seq_len, batch=args.batch, heads=args.heads,
                     kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, iters=args.iters,
                     warmup=args.warmup, ops=args.ops, compile=args.compile, seed=args.seed,
                     json_path=args.json)
    return 0
