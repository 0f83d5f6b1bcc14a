"""One run owns a checkpoint directory: an exclusive `flock` on `<dir>/.seqpar-lock`.

Rank 0 takes the lock before anything is written and holds it (an open file
descriptor) until its process ends; the kernel drops an flock when its holder dies,
even by SIGKILL, so a crashed run never leaves a stale lock behind. The file holds the
holder's run id, host and pid, so a second run pointed at the same directory (a
requeued job while the old one still runs, a copy-pasted config) fails at once, on
every rank, naming who holds it. On file systems where flock is local to a node (some
NFS setups), two runs on different nodes are not excluded: keep checkpoint.dir per job.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import secrets
import socket
from pathlib import Path

from ..errors import SeqparError
from .safety import raise_together
import torch.distributed as dist

LOCK_NAME = ".seqpar-lock"

_held: dict[str, int] = {}  # resolved dir -> open fd, for the life of this process


def new_run_id() -> str:
    """Unique per invocation: time, then randomness (readable in directory listings)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process (its lock file is unreadable)"
    return (f"run {info.get('run_id', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"started {info.get('started', '?')})")


def acquire(root: str | Path, run_id: str) -> None:
    """Take `root`'s lock for this process (idempotent), or raise SeqparError naming the
    holder. Creates `root` if needed; an unwritable `root` is a clear error too."""
    root = Path(root)
    key = str(root.resolve())
    if key in _held:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SeqparError(f"cannot use checkpoint.dir {root}: {e.strerror or e}; choose a directory this "
                          f"job can write (checkpoint.dir).") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SeqparError(f"checkpoint.dir {root} is in use by {_holder_text(root / LOCK_NAME)}; two runs "
                          f"writing one directory would mix their checkpoints. Wait for it to end (or stop "
                          f"it), or give this run another checkpoint.dir.") from None
    info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd


def release(root: str | Path) -> None:
    fd = _held.pop(str(Path(root).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing drops the flock; the file stays (its content is informational)


def acquire_together(root: str | Path, run_id: str) -> None:
    """Collective: rank 0 takes the lock; every rank raises the same error if it cannot."""


    raise_together(lambda: acquire(root, run_id) if dist.get_rank() == 0 else None)


_run_id: str | None = None


def agree_run_id() -> str:
    """Collective: this invocation's run id, chosen by rank 0 (once per process)."""
    global _run_id
    if _run_id is None:

        box = [new_run_id() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        _run_id = box[0]
    return _run_id
