"""The ``seqpar`` command. Thin: it parses arguments and calls into the package.

    seqpar --version
    seqpar train CONFIG.yaml [--set section.key=value ...] [--resume]
    seqpar bench attention --algo ring,ulysses,hybrid --world-size 4 --seq-len 4096
    seqpar bench kernels [--device cuda] [--seq-len 4k,8k,...]
    seqpar build-ext
    seqpar doctor [--device cuda] [--dtype bfloat16] [--head-dim 128]
    seqpar plan --model configs/models/llama3_8b_shape.json --seq-len 128k --gpus 8 --gpu-mem 80GiB
    seqpar bench memory --model configs/models/bench_small.json --seq-len 2048,4096 --world-size 2
    seqpar eval ppl --model DIR --lengths 1k,2k,4k [--sp-size N] [--compare OTHER/ppl.json]
    seqpar eval passkey --model DIR --lengths 256,1k --depths 0,0.5,1
    seqpar study extend configs/studies/extend/study.yaml [--fast]
    seqpar ckpt info|convert CHECKPOINT_DIR

Invalid input (`seqpar.errors.SeqparError`) exits with status 2 and its message, which
names the fix; a failed rank of a spawned run exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .bench import attention
from .bench.doctor import add_parser as add_doctor
from .bench.kernels import add_parser as add_kernels_bench
from .bench.loss import run_loss_memory_bench
from .bench.memory import add_parser as add_memory_bench
from .errors import SeqparError, print_error
from .eval.cli import add_eval_commands
from .ops import _build, attention_backend
from .parallel.spawn import DistributedRunError
from .plan.cli import add_plan_command
from .stages import run_stages
from .studies.extend import add_study_commands
from .train.ckpt_cli import add_ckpt_command
from .train.config_io import load_config
from .train.elastic import stated_keys
from .train.loop import shutdown_distributed


def _bench_attention_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.set_defaults(func=_run_bench_attention)


def _run_bench_attention(args) -> int:
    cfg = attention.BenchConfig(
        algos=attention.parse_algos(args.algo), world_size=args.world_size,
        seq_len=args.seq_len, ulysses_size=args.ulysses_size, batch=args.batch,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
        layout=args.layout, causal=args.causal, iters=args.iters, warmup=args.warmup,
        baseline=args.baseline, device=args.device, seed=args.seed, timeout=args.timeout,
        kernels=tuple(k.strip() for k in args.kernel.split(",") if k.strip()))
    try:
        attention.main(cfg, json_path=args.json)
    except DistributedRunError as e:
        print_error(f"a benchmark rank failed:\n{e}")
        return 1
    return 0


def _run_train(args) -> int:
    cfg = load_config(args.config, args.set or ())
    run_stages(cfg, resume=args.resume, stop_after=args.stop_after, stated=stated_keys(args.set))
    shutdown_distributed()
    return 0


def _run_build_ext(args) -> int:
    status = _build.load_extension()
    print(f"built: {status.kind} ({status.reason})")
    print(f"sources: {', '.join(status.sources)}")
    print(f"cuda arch list: {status.arch_list or '-'}")
    print(f"cache dir: {status.build_dir}")
    took = "cached" if status.build_seconds is None else f"{status.build_seconds:.0f} s"
    print(f"build time: {took}")
    print(f"attention kernels (cpu float32 d64): {attention_backend()}")
    return 0 if status.loaded else 1  # ahead of time, a failed build is an error


def _run_bench_loss(args) -> int:
    lengths = [int(x) for x in args.seq_len.split(",")]
    run_loss_memory_bench(lengths, vocab=args.vocab, hidden=args.hidden, dtype=args.dtype,
                          chunk_size=args.chunk_size, mem_limit_gib=args.mem_limit_gib)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqpar", description="Exact sequence-parallel attention for long-context training.")
    parser.add_argument("--version", action="version", version=f"seqpar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="continued pretraining under sequence parallelism (DeepSpeed ZeRO)",
        description="Train as configured by a run YAML; launch it with launch/*.sh "
                    "(torchrun, deepspeed, mpirun, slurm, or cpu_gloo for CPU ranks).")
    train.add_argument("config", help="run YAML, e.g. configs/tiny_cpu_demo.yaml")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set train.lr=1e-5")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in checkpoint.dir")
    train.add_argument("--stop-after", type=int, metavar="N",
                       help="stop after N steps of this invocation (checkpoint written); "
                            "a later --resume continues the same schedule")
    train.set_defaults(func=_run_train)

    bench = commands.add_parser("bench", help="measure time, communication and memory")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH")
    _bench_attention_args(benches.add_parser(
        "attention", help="ring / Ulysses / hybrid attention vs one process",
        description="Time, bytes sent (measured vs theoretical) and peak memory per rank of "
                    "sequence-parallel attention forward+backward on spawned processes, "
                    "against one process doing the whole sequence."))
    loss = benches.add_parser(
        "loss", help="peak memory of the LM-head loss step: transformers' default vs seqpar tiled",
        description="One loss forward+backward per path and length, each in its own process; "
                    "peak memory above the inputs, as a ratio to transformers' default path.")
    loss.add_argument("--seq-len", default="4096,8192", help="comma-separated token counts")
    loss.add_argument("--vocab", type=int, default=131072)
    loss.add_argument("--hidden", type=int, default=256)
    loss.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    loss.add_argument("--chunk-size", type=int, default=None, help="tokens per tile (default: ~256 MiB of logits)")
    loss.add_argument("--mem-limit-gib", type=float, default=None,
                      help="cap each process's memory so a path that does not fit fails cleanly")
    loss.set_defaults(func=_run_bench_loss)
    add_memory_bench(benches)
    add_kernels_bench(benches)
    bench.set_defaults(func=lambda args: _missing(bench))

    add_eval_commands(commands)
    add_study_commands(commands)
    add_plan_command(commands)
    add_ckpt_command(commands)

    add_doctor(commands)

    commands.add_parser(
        "build-ext", help="compile the seqpar ops (csrc/) now and say what was built",
        description="JIT-build the C++ (and CUDA, when torch and nvcc have it) ops into the cache "
                    "($SEQPAR_EXT_DIR or ~/.cache/seqpar/ext) and print what was built.",
    ).set_defaults(func=_run_build_ext)
    return parser


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _quiet_library_progress_bars() -> None:
    """seqpar prints its own progress; per-rank library bars would interleave N times."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_progress_bars()
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except SeqparError as e:
        print_error(str(e))
        _let_sibling_ranks_report()
        return parser.exit(2)


# Seconds a failing rank waits before exiting: torchrun kills the other ranks as soon as one
# exits, and each must get to say its error too (before the process group exists, or when
# a collective check failed on every rank at once and a sibling is a moment behind).
SIBLING_REPORT_GRACE_S = 3.0


def _let_sibling_ranks_report() -> None:
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        time.sleep(SIBLING_REPORT_GRACE_S)


if __name__ == "__main__":
    sys.exit(main())
