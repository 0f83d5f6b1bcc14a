"""Run a function on W spawned processes with real ``torch.distributed``.

    from seqpar.parallel.spawn import run_distributed
    results = run_distributed(fn, 2, x, y=3)   # fn(x, y=3) on ranks 0 and 1

Used by the test suite and by ``seqpar bench`` (one host, gloo on the CPU, or nccl
with one GPU per rank). ``fn`` must be module-level (spawn pickles it by reference);
it reads its rank and world size from ``torch.distributed``.  Its return value must
be picklable (prefer CPU tensors).  Any failure -- an exception, a silent death, a
hang -- becomes a `DistributedRunError` in the parent that names the rank and carries
its traceback.  Process start-up (importing torch) is the main cost: group many
cases into one call.
"""
from __future__ import annotations

import logging
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..runtime import init_local_rank

__all__ = ["DistributedRunError", "run_distributed"]

# After one rank fails, its peers usually fail too (closed connections) or sit
# blocked in a collective; wait this long for their reports, then kill them.
FAIL_GRACE_S = 3.0
# A dead child's report is already in the pipe, but reading it may race the
# exit code by a moment.
POLL_S = 0.1


class DistributedRunError(AssertionError):
    """A rank of `run_distributed` failed, died silently, hung past the timeout, or
    exited uncleanly. The message names the ranks and includes their tracebacks.

    It subclasses AssertionError so that under pytest a failing rank reads as a test
    failure (and callers that catch AssertionError keep working).
    """


def _free_port() -> int:
    # The OS picks an unused port; a tiny race remains until rank 0 binds it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, pg_timeout_s, fn, args, kwargs, q):
    torch.set_num_threads(1)  # W ranks share few cores; avoid oversubscription
    try:
        # Below the harness timeout, so a stuck collective raises here
        # with a traceback before the parent has to kill us.
        init_local_rank(rank, world_size, port, backend, pg_timeout_s)
        # Pickle here, not in the queue's feeder thread, so an unpicklable
        # result is reported as this rank's error instead of lost.
        result = pickle.dumps(fn(*args, **kwargs))
    except BaseException:  # SystemExit and KeyboardInterrupt too
        q.put((rank, False, traceback.format_exc()))
    else:
        # Report first: this rank is done whatever its peers do next, and a peer
        # still running past the process-group timeout must not turn a finished
        # rank into a failed one (the harness deadline names the peer instead).
        q.put((rank, True, result))
        # Tearing down while a peer still drains a message aborts gloo: meet first.
        # Best effort: a peer that never arrives is reported by its own rank or by
        # the harness deadline.
        try:
            dist.barrier()
        except Exception:
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # As `seqpar.cli.run` does: the report is flushed to the parent, then the process ends
    # here. Interpreter finalization (a spawned child leaves through sys.exit) can let a
    # communication thread abort a rank that already reported ("terminate called without
    # an active exception", seen in CI), which would fail a good run.
    q.close()
    q.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _stop(procs) -> None:
    """terminate, then kill what is left; join all so no zombie remains."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join()


class _Reports:
    """What the ranks reported: results and errors by rank, and the order of failures."""

    def __init__(self, world_size: int):
        self.world_size, self.results, self.errors, self.order = world_size, {}, {}, []

    def take(self, item) -> None:
        rank, ok, payload = item
        if ok:
            self.results[rank] = pickle.loads(payload)
        else:
            self.fail(rank, payload)

    def fail(self, rank: int, text: str) -> None:
        self.errors[rank] = text
        self.order.append(rank)

    def done(self) -> bool:
        return len(self.results) + len(self.errors) >= self.world_size

    def silent(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.results and r not in self.errors]

    def blame_the_dead(self, procs, q) -> None:
        """Children that died without a report: drain what is already in the pipe first,
        then blame the rest on their exit code."""
        dead = [r for r in self.silent() if procs[r].exitcode is not None]
        if not dead:
            return
        try:
            while True:
                self.take(q.get_nowait())
        except queue_mod.Empty:
            pass
        for r in dead:
            if r in self.silent():
                self.fail(r, f"process exited with code {procs[r].exitcode} without reporting a result\n")


def _collect(reports: _Reports, procs, q, deadline: float) -> bool:
    """Wait for every rank's report (a rank failing gives the others FAIL_GRACE_S more);
    True when the whole run's deadline passed first."""
    kill_at = None  # set once a rank fails
    while not reports.done():
        now = time.monotonic()
        if now >= deadline:
            return True
        if kill_at is not None and now >= kill_at:
            return False
        try:
            reports.take(q.get(timeout=POLL_S))
        except queue_mod.Empty:
            reports.blame_the_dead(procs, q)
        if reports.errors and kill_at is None:
            kill_at = time.monotonic() + FAIL_GRACE_S
    return False


def _raise_failures(reports: _Reports, procs, timed_out: bool, timeout, backend) -> None:
    results, order, silent = reports.results, reports.order, reports.silent()
    where = f"world_size={reports.world_size}, backend={backend}"
    blocks = "\n".join(f"--- rank {r} ---\n{reports.errors[r]}" for r in order)
    if timed_out:
        raise DistributedRunError(
            f"run_distributed timed out after timeout={timeout}s ({where}); ranks finished: "
            f"{sorted(results)}; ranks failed: {order}; ranks killed while still running: {silent}\n" + blocks)
    if reports.errors:
        raise DistributedRunError(
            f"rank {order[0]} failed ({where}, timeout={timeout}s); ranks failed in order: {order}; "
            f"ranks finished: {sorted(results)}; ranks killed {FAIL_GRACE_S}s after the first failure: "
            f"{silent}\n" + blocks)
    bad_exit = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad_exit:
        raise DistributedRunError(
            f"all ranks reported results but exited uncleanly (rank: exit code, "
            f"negative = killed by signal) {bad_exit}; timeout={timeout}s")


def run_distributed(fn, world_size, *args, timeout=300.0, backend="gloo", **kwargs):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    Each rank is a fresh spawned process with one torch thread, the process group of
    ``backend`` ("gloo", or "nccl" with GPU ``rank`` as its device) already joined,
    and RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set. ``timeout`` (seconds) bounds the whole
    run; the process group's own timeout is set a little below it, so a stuck
    collective raises inside the rank with a traceback. Raises `DistributedRunError`.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    pg_timeout_s = max(1.0, min(timeout * 0.9, timeout - 5.0))
    procs, reports = [], _Reports(world_size)
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker, name=f"rank{rank}",
                            args=(rank, world_size, port, backend, pg_timeout_s, fn, args, kwargs, q))
            p.start()
            procs.append(p)
        timed_out = _collect(reports, procs, q, deadline)
        if not reports.errors and not timed_out:
            # Everyone reported; give them the rest of the budget to exit cleanly.
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        q.close()
        q.join_thread()
    _raise_failures(reports, procs, timed_out, timeout, backend)
    return [reports.results[r] for r in range(world_size)]
