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
import logging
import os
import sys
import time

import torch.distributed as dist

from . import __version__
from .bench import attention, doctor, kernels, loss, memory
from .commands import add_group
from .errors import SeqparError, print_error
from .eval import cli as eval_cli
from .ops import _build, attention_backend
from .plan import cli as plan_cli
from .stages import run_stages
from .studies import extend as extend_study
from .train import ckpt_cli
from .train.config_io import load_config
from .train.elastic import stated_keys
from .train.loop import shutdown_distributed, torn_down


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


def _add_train(commands) -> None:
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


def _add_bench(commands) -> None:
    benches = add_group(commands, "bench", help="measure time, communication and memory", metavar="BENCH")
    for add_parser in BENCHES:
        add_parser(benches)


def _add_build_ext(commands) -> None:
    commands.add_parser(
        "build-ext", help="compile the seqpar ops (csrc/) now and say what was built",
        description="JIT-build the C++ (and CUDA, when torch and nvcc have it) ops into the cache "
                    "($SEQPAR_EXT_DIR or ~/.cache/seqpar/ext) and print what was built.",
    ).set_defaults(func=_run_build_ext)


# Every command, in the order `seqpar --help` lists them; each adds its parser and `func`.
COMMANDS = (_add_train, _add_bench, eval_cli.add_parser, extend_study.add_parser, plan_cli.add_parser,
            ckpt_cli.add_parser, doctor.add_parser, _add_build_ext)
BENCHES = (attention.add_parser, loss.add_parser, memory.add_parser, kernels.add_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqpar", description="Exact sequence-parallel attention for long-context training.")
    parser.add_argument("--version", action="version", version=f"seqpar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(commands)
    return parser


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
# exits, and each must get to say its error too. Before the process group exists a sibling
# may still be importing when this rank fails its check; after it, checks fail on every rank
# together (the failures are gathered), and a sibling is at most a moment behind.
SIBLING_REPORT_GRACE_S = {"before init": 3.0, "after init": 0.5}


def _let_sibling_ranks_report() -> None:
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        time.sleep(SIBLING_REPORT_GRACE_S["after init" if dist.is_initialized() else "before init"])


def run() -> None:
    """The `seqpar` command and `python -m seqpar.cli`: `main`, then the process ends.

    A rank whose process group was torn down after a finished run ends with `os._exit`:
    everything is written by then (checkpoints atomically, logs closed), and leaving the
    exit to C++ static destructors lets a communication thread abort a rank that finished
    its work ("terminate called without an active exception", seen again in CI after the
    teardown), which fails a good job. In-process callers of `main` are not affected."""
    code = main()
    if torn_down():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    run()
