"""Joining the job and the run's dtypes: the one start-up every entry point uses.

Below `parallel/` (it needs only torch, plus DeepSpeed's comm layer for training): the
trainer, the evaluations and `init_mesh` all join the job here, however it was launched
(torchrun or deepspeed env vars, or mpirun's MPI env).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import SeqparError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")  # mpirun (Open MPI, MPICH/PMI)


def resolve_dtype(name: str) -> torch.dtype:
    """A config's dtype name; `auto` is bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def launched_by_mpi() -> bool:
    return not dist.is_initialized() and "RANK" not in os.environ and any(k in os.environ for k in MPI_RANK_VARS)


def in_distributed_job() -> bool:
    """Started by torchrun / deepspeed / mpirun (or torch.distributed already up)?"""
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or \
        any(k in os.environ for k in MPI_RANK_VARS)


def join_process_group() -> None:
    """torch.distributed only: join the job described by torchrun/deepspeed env vars."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SeqparError(
            "torch.distributed is not initialized and RANK/WORLD_SIZE are not set; start the "
            "program with torchrun, deepspeed or launch/cpu_gloo.sh, or call "
            "torch.distributed.init_process_group first.")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _default_subgroup_timeout(timeout: datetime.timedelta) -> None:
    """Subgroups (DeviceMesh dims, the SP group, DeepSpeed's groups) are created without a
    timeout and so get torch's module default (30 min), not the world group's: a stopped
    rank then hung ring attention's p2p for 30 min. Make the default this run's timeout."""
    from torch.distributed import distributed_c10d as c10d  # private module: looked up, not re-exported

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the job however it was launched, with DeepSpeed's comm layer on top (training
    needs it; also when torch.distributed is already up, e.g. in tests). A dead or stuck
    rank fails every collective after `timeout_minutes` instead of hanging."""
    import deepspeed  # deferred: heavy, and only training and evaluation jobs need it
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    _default_subgroup_timeout(timeout)
    # MPI discovery sets MASTER_PORT from distributed_port: keep the one the launcher chose.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=launched_by_mpi(), verbose=False,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)), timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
