"""Multi-process test helpers.

The spawn harness itself lives in the package (`seqpar.parallel.spawn`, also used by
``seqpar bench``); this module re-exports it and adds the pytest-specific helpers.

    results = run_distributed(fn, 2, x, y=3)   # fn(x, y=3) on ranks 0 and 1

``fn`` must be module-level (spawn pickles it by reference); any failing, dying or
hanging rank becomes an AssertionError (`DistributedRunError`) naming the rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.parallel.spawn import FAIL_GRACE_S, DistributedRunError, run_distributed

__all__ = ["FAIL_GRACE_S", "DistributedRunError", "backends_to_test", "cuda_world_size",
           "device_for", "requires_gpus", "run_distributed"]


def cuda_world_size() -> int:
    return torch.cuda.device_count()


def requires_gpus(n: int):
    return pytest.mark.skipif(cuda_world_size() < n, reason=f"needs {n} CUDA GPUs")


def backends_to_test() -> list[str]:
    """gloo always; nccl too where >= 2 GPUs are visible (for parametrize)."""
    nccl = cuda_world_size() >= 2 and dist.is_nccl_available()
    return ["gloo", "nccl"] if nccl else ["gloo"]


def device_for(backend: str) -> torch.device:
    """The device a rank's tensors live on; call inside the worker."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sp_summed_grads(model, group, dtype=None) -> list[torch.Tensor]:
    """Each parameter's gradient summed over the SP group: what one process computing the
    whole sequence would hold (every SP rank saw only its shard's tokens)."""
    grads = []
    for p in model.parameters():
        g = p.grad.clone() if dtype is None else p.grad.to(dtype).clone()
        dist.all_reduce(g, group=group)
        grads.append(g)
    return grads
