"""`seqpar plan`: predict the per-GPU memory of a training step (parameters, gradients,
optimizer states, activations, transient peaks, comm buffers) for each SP size and ZeRO
stage, and the longest sequence that fits in --gpu-mem.

    seqpar plan --model configs/models/llama3_8b_shape.json --seq-len 128k --gpus 8 \
        --gpu-mem 80GiB --zero 3 [--offload]

The numbers come from `seqpar.plan.memory` (what each term counts is written there);
`seqpar bench memory` measures the same runs and prints prediction / measurement.
"""

from __future__ import annotations

from dataclasses import replace

from ..commands import about
from ..errors import SeqparError
from ..parallel.head_groups import check_head_groups
from ..tables import markdown_table
from ..units import GIB, parse_bytes, parse_tokens
from .memory import ModelShape, RunShape, estimate
import argparse

MAX_SEARCH_TOKENS = 1 << 26  # 64M tokens: the longest sequence `plan` searches up to


def _arg(parse):
    """An argparse `type=` that shows the parser's own message for bad values."""

    def convert(text):
        try:
            return parse(text)
        except SeqparError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def load_shape(model: str):
    """ModelShape of a config file/dir or a Hugging Face name (from its config only)."""
    from transformers import AutoConfig  # deferred: transformers (heavy); `seqpar plan` registers at every CLI start


    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise SeqparError(f"cannot read a model config from {model!r} ({str(err).splitlines()[0]}); "
                          f"pass a config.json file, a model directory, or a Hub name this machine "
                          f"can reach (e.g. configs/models/llama3_8b_shape.json).") from None
    return ModelShape.from_config(config)


def max_seq_len(shape, run, capacity: int, granule: int) -> int:
    """Longest multiple of `granule` tokens whose estimate fits in `capacity` (0: none)."""

    def fits(n):
        return estimate(shape, replace(run, seq_len=n)).total <= capacity

    if not fits(granule):
        return 0
    lo, hi = granule, granule
    while hi < MAX_SEARCH_TOKENS and fits(hi * 2):
        hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi) (or the search cap)
    while hi - lo > granule:
        mid = (lo + hi) // 2 // granule * granule
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def sp_choices(gpus: int, seq_len: int, heads: int, attention: str) -> list[int]:
    """SP sizes that divide the GPUs (and the sequence, zigzag: 2 x SP), Ulysses: the heads."""
    out = []
    for sp in range(1, gpus + 1):
        if gpus % sp or seq_len % (2 * sp):
            continue
        if attention == "ulysses" and heads % sp:
            continue
        out.append(sp)
    return out


def plan(shape, base, gpus: int, capacity: int, sp_sizes, zeros, *, baseline: bool = True) -> list[dict]:
    """One row per (SP, ZeRO) and, with `baseline`, transformers without seqpar per ZeRO."""

    rows = []
    for zero in zeros:
        choices = [(sp, False) for sp in sp_sizes] + ([(1, True)] if baseline else [])
        for sp, plain in choices:
            run = replace(base, world=gpus, sp_size=sp, zero=zero, plain_transformers=plain,
                          offload_params=base.offload_params and zero == 3)
            if plain:
                run = replace(run, gradient_checkpointing=False, tiled_mlp=None, tiled_layer=None,
                              offload_activations=False)
            est = estimate(shape, run)
            rows.append({"sp_size": sp, "zero": zero, "plain_transformers": plain, "estimate": est,
                         "fits": est.total <= capacity,
                         "max_seq_len": max_seq_len(shape, run, capacity, 1024 * sp)})  # zigzag: 2 x SP divides it
    return rows


PLAN_FOOTNOTE = ("per GPU; grads/activations/transient/comm as at the peak moment. Model and its limits: "
                 "seqpar/plan/memory.py; check it on your hardware with `seqpar bench memory`.")


def format_plan(rows, shape, base, gpus: int, capacity: int) -> str:
    gib = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    feats = [n for n, on in (("grad checkpointing", base.gradient_checkpointing),
                             (f"tiled MLP ({base.tiled_mlp})", base.tiled_mlp and not base.tiled_layer),
                             (f"tiled layer ({base.tiled_layer})", base.tiled_layer),
                             (f"{base.head_groups} head groups", base.tiled_layer and base.head_groups > 1),
                             ("tiled loss", base.tiled_loss), ("offloaded activations", base.offload_activations),
                             ("optimizer offload", base.offload_optimizer)) if on]
    lines = [f"model: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
             f"heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}; {base.dtype}",
             f"run: {base.seq_len} tokens, micro batch {base.micro_batch}, {gpus} GPUs of {gib(capacity)} GiB; "
             f"seqpar features: {', '.join(feats) or 'none'}", ""]
    cells = []
    for r in rows:
        e = r["estimate"]
        setup = "transformers (DP, no SP)" if r["plain_transformers"] else f"seqpar SP={r['sp_size']}"
        cells.append([setup, r["zero"], *(gib(x) for x in (e.parameters, e.gradients, e.optimizer, e.activations,
                                                            e.transient, e.comm_buffers, e.total)),
                      e.peak_moment, "yes" if r["fits"] else "NO", r["max_seq_len"] or "-"])
    lines += markdown_table(["setup", "ZeRO", "params", "grads", "optimizer", "activations", "transient", "comm",
                             "total GiB", "peak at", "fits", "longest seq that fits"], cells, "lrrrrrrrrllr")
    return "\n".join(lines + ["", PLAN_FOOTNOTE])


def add_parser(commands) -> None:
    p = commands.add_parser(
        "plan", help="per-GPU memory for each SP size / ZeRO stage, and the longest sequence that fits",
        description=about(__doc__))
    p.add_argument("--model", required=True, metavar="CONFIG_OR_NAME",
                   help="config.json, model directory or Hub name (only its config is read)")
    p.add_argument("--seq-len", required=True, type=_arg(parse_tokens), help="tokens per sequence, e.g. 131072 or 128k")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (default 8)")
    p.add_argument("--gpu-mem", type=_arg(parse_bytes), default=parse_bytes("80GiB"),
                   help="memory per GPU (default 80GiB)")
    p.add_argument("--zero", default="3", help="ZeRO stage(s), e.g. 3 or 1,2,3 (default 3)")
    p.add_argument("--sp-size", help="SP size(s) to show (default: every one that divides --gpus)")
    p.add_argument("--attention", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--offload", action="store_true",
                   help="DeepSpeed optimizer offload to CPU (and parameter offload with ZeRO-3)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="without gradient checkpointing (default: on)")
    p.add_argument("--tiled-mlp", type=int, default=8192, metavar="TOKENS",
                   help="MLP tile in tokens; 0 = plain MLP (default 8192)")
    p.add_argument("--tiled-layer", type=int, default=0, metavar="TOKENS",
                   help="every token-wise part of each layer in tiles of TOKENS (parallel.tiled_layer); "
                        "0 = off (default)")
    p.add_argument("--head-groups", type=int, default=1, metavar="G",
                   help="the tiled layer's attention in G groups of heads, one at a time (parallel.head_groups; "
                        "default 1)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep checkpointed activations in pinned CPU memory")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="omit the transformers-without-seqpar rows")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:

    shape = load_shape(args.model)
    zeros = [int(z) for z in str(args.zero).split(",")]
    if any(z not in (0, 1, 2, 3) for z in zeros):
        raise SeqparError(f"--zero {args.zero}: stages are 0, 1, 2, 3.")
    if args.gpus < 1:
        raise SeqparError("--gpus must be at least 1.")
    if args.seq_len < 1:
        raise SeqparError(f"--seq-len must be at least 1 token, got {args.seq_len}; e.g. --seq-len 128k.")
    if args.gpu_mem <= 0:
        raise SeqparError(f"--gpu-mem must be more than 0 bytes, got {args.gpu_mem}; e.g. --gpu-mem 80GiB.")
    if args.micro_batch < 1:
        raise SeqparError(f"--micro-batch must be at least 1, got {args.micro_batch}.")
    if args.head_groups != 1:
        if not args.tiled_layer:
            raise SeqparError("--head-groups needs --tiled-layer (the tiled layer runs attention in head groups).")
        check_head_groups(shape.heads, shape.kv_heads, args.head_groups)
    if args.sp_size:
        sp_sizes = [int(s) for s in args.sp_size.split(",")]
        bad = [s for s in sp_sizes if args.gpus % s or args.seq_len % (2 * s)]
        if bad:
            raise SeqparError(f"--sp-size {bad[0]} must divide --gpus {args.gpus} and half of "
                              f"--seq-len {args.seq_len} (zigzag layout).")
    else:
        sp_sizes = sp_choices(args.gpus, args.seq_len, shape.heads, args.attention)
        dropped = [sp for sp in range(1, args.gpus + 1) if args.gpus % sp == 0 and sp not in sp_sizes]
        if not sp_sizes:
            raise SeqparError(f"no SP size fits: each must divide --gpus {args.gpus} and half of --seq-len "
                              f"{args.seq_len} (zigzag){' and the heads (ulysses)' if args.attention == 'ulysses' else ''}; "
                              f"use a --seq-len that is a multiple of {2 * args.gpus}.")
        if dropped:
            print(f"note: SP sizes {', '.join(map(str, dropped))} are not shown: they divide --gpus but not half "
                  f"of --seq-len {args.seq_len} (zigzag){' or the heads' if args.attention == 'ulysses' else ''}.",
                  flush=True)
    base = RunShape(seq_len=args.seq_len, world=args.gpus, attention=args.attention, dtype=args.dtype,
                    micro_batch=args.micro_batch, offload_optimizer=args.offload, offload_params=args.offload,
                    gradient_checkpointing=args.checkpointing, tiled_mlp=args.tiled_mlp or None,
                    tiled_layer=args.tiled_layer or None, head_groups=args.head_groups,
                    offload_activations=args.offload_activations)
    rows = plan(shape, base, args.gpus, args.gpu_mem, sp_sizes, zeros, baseline=args.baseline)
    print(format_plan(rows, shape, base, args.gpus, args.gpu_mem), flush=True)
    return 0

