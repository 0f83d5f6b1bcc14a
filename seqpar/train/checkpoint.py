"""Crash-safe DeepSpeed checkpoints: written to a temporary directory, marked complete,
then renamed into place; only complete checkpoints are ever resumed from.

Layout under `root`:
    step_00000040/            one complete checkpoint
        state/                DeepSpeed's files (model, ZeRO shards, optimizer, scheduler)
        rank_00000.pt ...     per-rank state: data position, RNG states
        COMPLETE              JSON written last, before the rename: step, world size and
                              the manifest (every file's relative path and size)
    latest                    the newest step directory name (written atomically)
    .tmp-step_00000050/       a save in progress (or one that crashed: ignored, cleaned)
    .old-step_00000010/       a checkpoint being deleted or replaced (ignored, cleaned)

DeepSpeed writes its own `latest` tag with a plain write and must be called on every
rank; we call it on every rank and keep our own pointer atomic. A directory is only
ever renamed to `step_*` after its COMPLETE marker exists, and renamed away from
`step_*` before it is deleted, so a crash at any moment leaves only complete `step_*`
directories (plus ignored leftovers). On load every rank checks the manifest before
DeepSpeed opens anything: a missing or truncated file is a clear error on every rank.
The manifest is taken by rank 0 and checked by every rank: the checkpoint directory
must be on a file system all ranks share (as the rename by rank 0 already requires).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import SeqparError
from .safety import agree_on_run, raise_together

TAG = "state"
COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def incomplete_checkpoints(self) -> list[Path]:
        """Leftovers of interrupted saves or deletions: never resumed from."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(".tmp-step_*")] + [p for p in self.root.glob(".old-step_*")]
        found += [p for p in self.root.glob("step_*") if p.is_dir() and not (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def _older_than(self, path: Path) -> Path | None:
        older = [p for p in self.complete_checkpoints() if p.name < Path(path).name]
        return older[-1] if older else None

    def _discard(self, path: Path) -> None:
        """Rename out of the `step_*` namespace first, so a crash mid-delete never leaves a
        half-deleted directory that still looks complete."""
        trash = self.root / f".old-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Collective: every rank must call it with the same step."""
        rank = dist.get_rank()
        final = self.root / self.step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # Saves are collective and one at a time: any leftover is from a crash.
            for stale in list(self.root.glob(".tmp-step_*")) + list(self.root.glob(".old-step_*")):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state)
        torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
        dist.barrier()  # every rank's files are on disk
        if rank == 0:
            files = {f.relative_to(tmp).as_posix(): f.stat().st_size
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = {"step": step, "world_size": dist.get_world_size(),
                    **{k: v for k, v in client_state.items() if isinstance(v, (int, float, str))},
                    "files": files}
            _atomic_write_text(tmp / COMPLETE, json.dumps(meta))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                self._discard(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / "latest", final.name)
            for old in self.complete_checkpoints()[:-self.keep_last]:
                self._discard(old)
        dist.barrier()
        return final

    def verify(self, path: Path, world_size: int | None, rank: int) -> None:
        """Raise SeqparError unless `path` is complete and every file it recorded is present
        with its recorded size (checks file metadata only: no file is opened)."""
        path = Path(path)
        marker = path / COMPLETE
        if not marker.is_file():
            raise SeqparError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); it was "
                              f"interrupted while saving. {self._fix(path)}")
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise SeqparError(f"{marker} is unreadable ({e}); the checkpoint is damaged. {self._fix(path)}")
        # world_size None: an elastic resume (seqpar.train.elastic) maps the ranks itself.
        if world_size is not None and meta.get("world_size") != world_size:
            raise SeqparError(f"{path} was written by {meta.get('world_size')} ranks but this job has "
                              f"{world_size}, and it records no layout to remap (it predates elastic "
                              f"resume): resume with {meta.get('world_size')} ranks.")
        expected = dict(meta.get("files") or {})  # checkpoints from before the manifest: rank files only
        expected.setdefault(f"rank_{rank:05d}.pt", None)
        problems = []
        for rel, size in sorted(expected.items()):
            f = path / rel
            if not f.is_file():
                problems.append(f"{rel} is missing")
            elif size is not None and f.stat().st_size != size:
                problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
        if problems:
            raise SeqparError(f"checkpoint {path} is damaged: {'; '.join(problems)}. {self._fix(path)}")

    def _fix(self, path: Path) -> str:
        older = self._older_than(path)
        if older is None:
            return ("No older complete checkpoint exists under "
                    f"{self.root}: restore the files, or start without --resume.")
        return (f"Resume from the previous checkpoint {older}: move {path} out of {self.root} "
                f"(or delete it) and run again with --resume.")

    def load(self, engine, path: Path | None = None) -> tuple[dict, dict]:
        """Collective. Load a complete checkpoint (default: the newest); returns
        (client_state, rank_state). Every rank verifies the checkpoint's files before
        DeepSpeed touches anything; a problem on any rank raises on every rank."""
        path = Path(path) if path else self.latest()
        if path is None:
            raise SeqparError(f"no complete checkpoint under {self.root}; start without --resume.")
        agree_on_run({"checkpoint": path.name}, what="the checkpoint to resume from")
        raise_together(self.verify, path, dist.get_world_size(), dist.get_rank())
        rank_file = path / f"rank_{dist.get_rank():05d}.pt"
        load_path, client_state = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise SeqparError(f"DeepSpeed could not load {path / TAG}; the checkpoint is damaged. "
                              f"{self._fix(path)}")
        rank_state = torch.load(rank_file, weights_only=False)
        return client_state or {}, rank_state
