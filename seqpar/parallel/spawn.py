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

import pickle
import queue as queue_mod
import socket
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
    procs = []
    results, errors, order = {}, {}, []  # order: ranks in order of failure
    deadline = time.monotonic() + timeout
    kill_at = None  # set once a rank fails
    timed_out = False

    def take(item):
        rank, ok, payload = item
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            order.append(rank)

    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker, name=f"rank{rank}",
                args=(rank, world_size, port, backend, pg_timeout_s, fn, args, kwargs, q),
            )
            p.start()
            procs.append(p)

        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if kill_at is not None and now >= kill_at:
                break
            try:
                take(q.get(timeout=POLL_S))
            except queue_mod.Empty:
                # Children that died without a report: drain what is already in
                # the pipe first, then blame the rest on their exit code.
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in results and r not in errors]
                if dead:
                    try:
                        while True:
                            take(q.get_nowait())
                    except queue_mod.Empty:
                        pass
                    for r in dead:
                        if r not in results and r not in errors:
                            errors[r] = (f"process exited with code {procs[r].exitcode} "
                                         "without reporting a result\n")
                            order.append(r)
            if errors and kill_at is None:
                kill_at = time.monotonic() + FAIL_GRACE_S

        if not errors and not timed_out:
            # Everyone reported; give them the rest of the budget to exit cleanly.
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        q.close()
        q.join_thread()

    silent = [r for r in range(world_size) if r not in results and r not in errors]
    blocks = [f"--- rank {r} ---\n{errors[r]}" for r in order]
    if timed_out:
        raise DistributedRunError(
            f"run_distributed timed out after timeout={timeout}s "
            f"(world_size={world_size}, backend={backend}); "
            f"ranks finished: {sorted(results)}; ranks failed: {order}; "
            f"ranks killed while still running: {silent}\n" + "\n".join(blocks))
    if errors:
        raise DistributedRunError(
            f"rank {order[0]} failed (world_size={world_size}, backend={backend}, "
            f"timeout={timeout}s); "
            f"ranks failed in order: {order}; ranks finished: {sorted(results)}; "
            f"ranks killed {FAIL_GRACE_S}s after the first failure: {silent}\n"
            + "\n".join(blocks))
    bad_exit = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad_exit:
        raise DistributedRunError(
            f"all ranks reported results but exited uncleanly (rank: exit code, "
            f"negative = killed by signal) {bad_exit}; timeout={timeout}s")
    return [results[r] for r in range(world_size)]
