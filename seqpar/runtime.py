"""Joining the job: one `init_distributed` for every launcher, and dtype names.

torch-only (DeepSpeed is imported only when it is asked for), below `seqpar/parallel`:
everything that starts a process group — training, evaluation, `init_mesh`, the test
harness — goes through here.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from .errors import SeqparError

# Set by mpirun (Open MPI) and by MPICH / Intel MPI / Slurm's PMI.
MPI_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype name of the config; "auto" is bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launched_by_mpi() -> bool:
    """Started by mpirun without torchrun-style env vars (RANK): ranks come from MPI."""
    return "RANK" not in os.environ and any(k in os.environ for k in MPI_ENV_VARS)


def in_distributed_job() -> bool:
    """Started by torchrun / deepspeed / mpirun (or torch.distributed already up)?"""
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or \
        any(k in os.environ for k in MPI_ENV_VARS)


def set_default_timeout(timeout: datetime.timedelta) -> None:
    """Subgroups (DeviceMesh dims, the SP group, DeepSpeed's groups) are created without a
    timeout and so get torch's module default (30 min), not the world group's: a stopped
    rank then hung ring attention's p2p for 30 min. Make the default this run's timeout."""
    from torch.distributed import distributed_c10d as c10d  # deferred: private torch module, only when joining

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)


def init_distributed(timeout_minutes: float = 30.0, *, deepspeed: bool = True) -> None:
    """Join the job however it was launched: torchrun/deepspeed env vars, or mpirun (MPI).

    deepspeed=True (training, evaluation): through `deepspeed.init_distributed`, so that
    DeepSpeed's comm layer is up too (also over an existing torch.distributed group) and MPI
    ranks are discovered. deepspeed=False (`init_mesh` outside a run): plain torch from the
    launcher's RANK/WORLD_SIZE. A dead or stuck rank fails every collective after
    `timeout_minutes` instead of hanging.
    """
    if not deepspeed:
        if dist.is_initialized():
            return
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SeqparError(
                "torch.distributed is not initialized and RANK/WORLD_SIZE are not set; start the "
                "program with torchrun, deepspeed or launch/cpu_gloo.sh, or call "
                "torch.distributed.init_process_group first.")
        dist.init_process_group(default_backend())
        return
    import deepspeed as ds  # deferred: heavy optional dependency, only for launched jobs
    import deepspeed.comm as ds_comm  # deferred: as above

    if ds_comm.is_initialized():
        return
    from_mpi = not dist.is_initialized() and launched_by_mpi()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    set_default_timeout(timeout)
    # MPI discovery sets MASTER_PORT from distributed_port: keep the one the launcher chose.
    ds.init_distributed(dist_backend=default_backend(), auto_mpi_discovery=from_mpi, verbose=False,
                        distributed_port=int(os.environ.get("MASTER_PORT", 29500)), timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def init_local_rank(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> None:
    """Join a job of `world_size` processes on this host (the test harness's spawned ranks)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if backend == "gloo" and sys.platform.startswith("linux"):
        # Everything is on this host; don't depend on how the hostname resolves.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
