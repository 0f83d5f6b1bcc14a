"""Checks that need the file system, made before distributed init or the model build, so
that a run which cannot save its work fails before step 1, not at its first checkpoint.

    check_before_init(cfg)            # numbers, directories writable: no torch.distributed yet
    check_free_space(cfg, config, w)  # room for one checkpoint, from the model's size
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from ..errors import SeqparError
from ..runtime import resolve_dtype
from ..units import GIB
from .ckpt_integrity import free_bytes
from ..plan.memory import ModelShape



def check_timeout(cfg) -> None:
    timeout = cfg.train.dist_timeout_minutes
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not timeout > 0:
        raise SeqparError(f"train.dist_timeout_minutes must be a positive number of minutes, got {timeout!r}; "
                          f"set train.dist_timeout_minutes to e.g. 30.")


def check_writable(path: str | None, key: str) -> None:
    """`path` can be created (if missing) and written by this process."""
    if not path:
        return
    target = Path(path)
    for parent in [target, *target.parents]:
        if parent.exists() and not parent.is_dir():
            raise SeqparError(f"{key}={path} cannot be a directory: {parent} is a file; set {key} "
                              f"to a directory path.")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".seqpar-write-probe-"):
            pass
    except OSError as e:
        raise SeqparError(f"{key}={path} is not writable by this job ({e.strerror or e}); set {key} to a "
                          f"directory this job can write, or fix its permissions.") from None


def check_before_init(cfg) -> None:
    check_timeout(cfg)
    check_writable(cfg.checkpoint.dir, "checkpoint.dir")
    check_writable(cfg.checkpoint.export_hf, "checkpoint.export_hf")
    check_writable(cfg.log.dir, "log.dir")


def checkpoint_bytes(params: int, dtype_bytes: int, optimizer: str) -> int:
    """One checkpoint on a shared file system, all ranks together: the weights once
    (ZeRO 0-2 write them from one rank, ZeRO-3 as partitions that add up to the same) and
    the optimizer partitions, which also add up to one whole copy: fp32 master weights
    plus Adam's two moments (12 bytes a parameter; SGD: master weights only)."""
    per_param = dtype_bytes + (4 if optimizer == "sgd" else 12)
    return params * per_param


def estimate_checkpoint_bytes(cfg, config) -> int:

    params = ModelShape.from_config(config).params
    return checkpoint_bytes(params, resolve_dtype(cfg.model.dtype).itemsize, cfg.train.optimizer)


def check_free_space(root: str | Path, need: int, key: str = "checkpoint.dir") -> None:
    where, free = free_bytes(Path(root))
    if free < need:
        raise SeqparError(f"no space for a checkpoint on {where} ({key}): one checkpoint needs ~"
                          f"{need / GIB:.2f} GiB, {free / GIB:.2f} GiB are free; free space there or set "
                          f"{key} to a larger disk.")


def space_message(where: str | Path, need: int, free: int) -> str:
    return f"no space left on {where}: need ~{need / GIB:.3f} GiB, have {free / GIB:.3f} GiB"
