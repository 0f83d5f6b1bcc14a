"""`seqpar ckpt info | convert`: look at a checkpoint, convert it for an elastic resume.

    seqpar ckpt info runs/x/checkpoints                  # newest step: step, layout, conversions
    seqpar ckpt convert runs/x/checkpoints [--workers 8] # DeepSpeed universal format, ahead of a resume

`--resume` on another world size converts automatically (rank 0, the other ranks wait up
to train.dist_timeout_minutes); for a large model convert ahead of time with this command,
on one node with the checkpoint's file system mounted.
"""

from __future__ import annotations

import argparse
import json

from ..commands import about, add_group
from ..errors import SeqparError
from .elastic import convert_to_universal, is_converted, resolve_step_dir, saved_layout, universal_dir


def add_parser(commands) -> None:
    actions = add_group(commands, "ckpt", help="inspect a checkpoint or convert it for an elastic resume",
                        description=about(__doc__), metavar="ACTION")
    info = actions.add_parser("info", help="step, layout (ranks, SP/DP, global batch, seq_len), conversions")
    info.add_argument("path", help="a checkpoint.dir (its newest complete step) or one step_* directory")
    info.set_defaults(func=_info)
    convert = actions.add_parser(
        "convert", help="write DeepSpeed's universal checkpoint of a step (for a resume on another world size)",
        description="Runs DeepSpeed's ds_to_universal on one complete step into CHECKPOINT_DIR/universal/"
                    "step_N/, which `seqpar train --resume` on another number of ranks then loads.")
    convert.add_argument("path", help="a checkpoint.dir (its newest complete step) or one step_* directory")
    convert.add_argument("--workers", type=int, default=4, help="extraction processes (default 4)")
    convert.set_defaults(func=_convert)


def _info(args: argparse.Namespace) -> int:

    step_dir = resolve_step_dir(args.path)
    meta = json.loads((step_dir / "COMPLETE").read_text())
    layout = saved_layout(step_dir)
    print(f"checkpoint: {step_dir}")
    print(f"step: {meta.get('step')}")
    described = layout.describe() if layout else f"{meta.get('world_size')} ranks (no layout recorded)"
    print(f"layout: {described}")
    print(f"universal: {universal_dir(step_dir) if is_converted(step_dir) else 'not converted'}")
    return 0


def _convert(args: argparse.Namespace) -> int:

    if args.workers < 1:
        raise SeqparError(f"--workers must be >= 1, got {args.workers}.")
    step_dir = resolve_step_dir(args.path)
    out = convert_to_universal(step_dir, workers=args.workers)
    print(f"universal checkpoint of {step_dir.name}: {out}")
    return 0
