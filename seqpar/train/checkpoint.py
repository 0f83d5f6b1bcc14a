"""Crash-safe DeepSpeed checkpoints: written to a temporary directory, marked complete,
then renamed into place; only complete checkpoints are ever resumed from.

Layout under `root`:
    step_00000040/            one complete checkpoint
        state/                DeepSpeed's files (model, ZeRO shards, optimizer, scheduler)
        rank_00000.pt ...     per-rank state: data position, RNG states
        COMPLETE              JSON written last, before the rename
    latest                    the newest step directory name (written atomically)
    .tmp-step_00000050/       a save in progress (or one that crashed: ignored, cleaned)

DeepSpeed writes its own `latest` tag with a plain write and must be called on every
rank; we call it on every rank and keep our own pointer atomic.
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

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Collective: every rank must call it with the same step."""
        rank = dist.get_rank()
        final = self.root / self.step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
            tmp.mkdir()
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state)
        torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
        dist.barrier()  # every rank's files are on disk
        if rank == 0:
            meta = {"step": step, "world_size": dist.get_world_size(), **{k: v for k, v in client_state.items()
                                                                         if isinstance(v, (int, float, str))}}
            _atomic_write_text(tmp / COMPLETE, json.dumps(meta))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / "latest", final.name)
            for old in self.complete_checkpoints()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, engine, path: Path | None = None) -> tuple[dict, dict]:
        """Load a complete checkpoint (default: the newest); returns (client_state, rank_state)."""
        path = Path(path) if path else self.latest()
        if path is None:
            raise SeqparError(f"no complete checkpoint under {self.root}; start without --resume.")
        if not (path / COMPLETE).is_file():
            raise SeqparError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); it was "
                              f"interrupted while saving. Resume from {self.latest()} instead.")
        meta = json.loads((path / COMPLETE).read_text())
        if meta["world_size"] != dist.get_world_size():
            raise SeqparError(f"{path} was written by {meta['world_size']} ranks but this job has "
                              f"{dist.get_world_size()}; resume with the same number of ranks.")
        rank_file = path / f"rank_{dist.get_rank():05d}.pt"
        if not rank_file.is_file():
            raise SeqparError(f"{path} lacks {rank_file.name}; the checkpoint is damaged.")
        load_path, client_state = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise SeqparError(f"DeepSpeed could not load {path / TAG}; the checkpoint is damaged.")
        rank_state = torch.load(rank_file, weights_only=False)
        return client_state or {}, rank_state
