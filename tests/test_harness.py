"""Tests of the multi-process harness itself (tests/distributed.py)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import (backends_to_test, device_for, requires_gpus,
                               run_distributed)


# Workers are module-level so spawn can pickle them as tests.test_harness.<name>.

def _sum_of_ranks(offset, scale=1):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), os.environ["RANK"], offset + scale * t.item()


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 is left waiting on its peer


def _rank1_hangs():
    if dist.get_rank() == 1:
        time.sleep(60)
    dist.barrier()


def _rank1_sleeps():
    if dist.get_rank() == 1:
        time.sleep(60)  # no collective, so only the harness deadline can stop it
    return "done"


def _rank1_exits():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _unpicklable_result():
    return lambda: None


def _on_device(backend):
    t = torch.ones(2, device=device_for(backend)) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return t.cpu()


@pytest.mark.parametrize("world_size", [2, 3])
def test_results_ordered_by_rank_with_args_and_kwargs(world_size):
    out = run_distributed(_sum_of_ranks, world_size, 10.0, scale=2, timeout=60)
    total = sum(range(world_size))
    assert out == [(r, world_size, str(r), 10.0 + 2 * total) for r in range(world_size)]


def test_raising_rank_is_reported_quickly():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_rank1_raises, 2, timeout=120)
    msg = str(info.value)
    assert "rank 1" in msg
    assert "ValueError: boom from rank 1" in msg
    assert "Traceback" in msg and "_rank1_raises" in msg
    assert time.monotonic() - start < 90  # well below the 120 s timeout (loose: machines may be loaded)


def test_hang_in_collective_times_out():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_rank1_hangs, 2, timeout=10)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    # Rank 0's process-group timeout (set below the harness's) or the harness
    # deadline fires first; either way the message names the timeout.
    assert "timeout=10" in msg and "timed out" in msg.lower(), msg
    assert elapsed < 45, elapsed  # the hung rank sleeps 60 s: we did not wait for it


def test_hang_outside_collectives_hits_harness_deadline():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_rank1_sleeps, 2, timeout=8)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "timed out after timeout=8" in msg and "ranks finished: [0]" in msg, msg
    assert elapsed < 45, elapsed


def test_silent_death_reports_exit_code():
    with pytest.raises(AssertionError) as info:
        run_distributed(_rank1_exits, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1" in msg and "exited with code 3" in msg, msg


def test_unpicklable_result_is_a_rank_error():
    with pytest.raises(AssertionError) as info:
        run_distributed(_unpicklable_result, 2, timeout=60)
    assert "rank 0" in str(info.value) and "pickle" in str(info.value).lower()


def test_helpers():
    assert backends_to_test()[0] == "gloo"
    assert device_for("gloo") == torch.device("cpu")
    assert requires_gpus(10**6).args[0]  # skipif condition is true


@pytest.mark.parametrize("backend", backends_to_test())
def test_backends(backend):
    out = run_distributed(_on_device, 2, backend, backend=backend, timeout=120)
    assert all(torch.equal(t, torch.full((2,), 3.0)) for t in out)


@requires_gpus(2)
def test_nccl():
    out = run_distributed(_on_device, 2, "nccl", backend="nccl", timeout=120)
    assert all(torch.equal(t, torch.full((2,), 3.0)) for t in out)
