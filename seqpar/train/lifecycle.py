"""A worker's life, as a scheduler expects it: it dies with its launcher, it says how a
signalled stop ended, and when a peer stops answering it names that peer.

- `die_with_launcher()`: when the launcher (torchrun, the deepspeed launcher, mpirun's
  daemon) dies, even by SIGKILL, its workers get SIGKILL from the kernel
  (prctl PR_SET_PDEATHSIG) and, where that is unavailable, from a watchdog thread that
  polls the parent pid. An orphan must never train on and write checkpoints into a
  directory a requeued job is using. `orphaned()` is also checked before a save.
- `report_stop(step, checkpoint)`: after a SIGTERM/SIGINT stop, rank 0 writes the
  checkpoint it left to $SEQPAR_STOP_REPORT; the launch scripts read it to exit 0 even
  when torchrun itself was signalled (it then exits 1 on its own).
- `name_silent_ranks(error)`: after a collective timed out, each surviving rank writes
  "I timed out" to the job's key-value store and waits a little; the ranks that never
  write are the ones that stopped answering.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

from ..runtime import MPI_ENV_VARS
from torch.distributed import distributed_c10d as c10d
import sys
import torch.distributed as dist

STOP_REPORT_ENV = "SEQPAR_STOP_REPORT"
_PR_SET_PDEATHSIG = 1
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", *MPI_ENV_VARS, "SLURM_PROCID")

_parent_pid: int | None = None


def launched_by_launcher() -> bool:
    """Only workers of a launcher die with it: `nohup python -m seqpar.cli train` run by
    hand must outlive its shell."""
    return any(k in os.environ for k in _LAUNCHER_ENV)


def orphaned() -> bool:
    return _parent_pid is not None and os.getppid() != _parent_pid


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_launcher(poll_s: float = 1.0) -> bool:
    """Arm both guards (once per process). Returns True when armed."""
    global _parent_pid
    if _parent_pid is not None:
        return True
    if not launched_by_launcher():
        return False
    _parent_pid = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    if orphaned():  # the launcher died before prctl took effect
        _kill_self()

    def watch():
        while True:
            time.sleep(poll_s)
            if orphaned():
                _kill_self()

    threading.Thread(target=watch, name="seqpar-launcher-watchdog", daemon=True).start()
    return True


def exit_if_orphaned() -> None:
    if orphaned():
        _kill_self()


def report_stop(step: int, checkpoint) -> None:
    path = os.environ.get(STOP_REPORT_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"stopped at step {step}; checkpoint {checkpoint}\n")


def is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def name_silent_ranks(grace_s: float = 10.0) -> list[int] | None:
    """Collective-free: ranks that did not say "I timed out" within `grace_s` (None when
    the store is unreachable). Call on a rank whose collective timed out."""

    try:
        store = c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"seqpar/timed_out/{rank}", "1")
        deadline = time.monotonic() + grace_s
        silent = list(range(world))
        while time.monotonic() < deadline:
            silent = [r for r in range(world) if not store.check([f"seqpar/timed_out/{r}"])]
            if not silent:
                break
            time.sleep(0.5)
        return silent
    except Exception:  # noqa: BLE001 - naming is best effort; the launcher still reports
        return None


def exec_dying_with(parent_pid: int, argv: list[str]) -> None:
    """Become `argv` (exec), killed by the kernel when `parent_pid` (a launch script)
    dies. The death signal survives exec, so a launcher that is not seqpar's own code
    (torchrun) dies with the script that started it, and its workers die with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the script died before prctl took effect
        _kill_self()
    os.execvp(argv[0], argv)


if __name__ == "__main__":  # python -m seqpar.train.lifecycle PARENT_PID -- CMD ARGS...

    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m seqpar.train.lifecycle PARENT_PID -- CMD [ARGS...]")
    exec_dying_with(int(args[0]), args[2:])
