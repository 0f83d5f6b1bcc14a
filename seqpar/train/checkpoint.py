"""Crash-safe DeepSpeed checkpoints: written to a temporary directory, marked complete,
then renamed into place; only complete checkpoints are ever resumed from.

Layout under `root`:
    step_00000040/            one complete checkpoint
        state/                DeepSpeed's files (model, ZeRO shards, optimizer, scheduler)
        rank_00000.pt ...     per-rank state: data position, RNG states
        COMPLETE              JSON written last, before the rename: step, world size, the
                              run id and lineage, and the manifest: every file this save
                              wrote, with its size and digest (xxh3_128; ckpt_integrity.py)
    latest                    the newest step directory name (written atomically)
    .seqpar-lock              flock'd by the run that owns the directory (ckpt_lock.py)
    .tmp-<run id>-step_00000050/  a save in progress (or one that crashed: ignored, cleaned)
    .old-step_00000010/       a checkpoint being deleted or replaced (ignored, cleaned)
    replaced-<run id>/        checkpoints a fresh run moved aside (checkpoint.overwrite)

One run owns the directory (an flock held by rank 0), so leftovers of other runs are
crash leftovers. A fresh run (no --resume) refuses a directory that holds checkpoints;
pruning only removes checkpoints of this run's lineage (the run it resumed, transitively).

DeepSpeed writes its own `latest` tag with a plain write and must be called on every
rank; we call it on every rank and keep our own pointer atomic. A directory is only
ever renamed to `step_*` after its COMPLETE marker exists, and renamed away from
`step_*` before it is deleted, so a crash at any moment leaves only complete `step_*`
directories (plus ignored leftovers). On load every rank checks the manifest before
DeepSpeed opens anything: a missing, truncated or changed file (checksum) is a clear
error on every rank, and so is any error while loading; a checkpoint that failed is
never called the last good one again in this process.
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
from . import lifecycle
from .ckpt_integrity import HASH, VERIFY_MODES, WriteRecorder, check_files, free_bytes, hash_file, is_no_space
from .ckpt_lock import new_run_id
from .preflight import space_message
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
    def __init__(self, root: str | Path, keep_last: int = 2, *, run_id: str | None = None,
                 verify: str = "full", expected_bytes: int = 0):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.run_id = run_id or new_run_id()
        self.lineage = self.run_id  # a resume adopts the lineage of the checkpoint it loads
        if verify not in VERIFY_MODES:
            raise SeqparError(f"checkpoint.verify={verify!r} is not valid; choose one of {', '.join(VERIFY_MODES)}.")
        self.verify_mode = verify
        self.expected_bytes = expected_bytes  # estimate of one checkpoint (preflight), for messages
        self.failed: set[str] = set()  # checkpoints that failed to verify or load in this process

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            return json.loads((Path(path) / COMPLETE).read_text())
        except (OSError, ValueError):
            return {}

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def incomplete_checkpoints(self) -> list[Path]:
        """Leftovers of interrupted saves or deletions: never resumed from."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(".tmp-*")] + [p for p in self.root.glob(".old-step_*")]
        found += [p for p in self.root.glob("step_*") if p.is_dir() and not (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint that has not failed to load in this process."""
        done = [p for p in self.complete_checkpoints() if p.name not in self.failed]
        return done[-1] if done else None

    def _older_than(self, path: Path) -> Path | None:
        older = [p for p in self.complete_checkpoints() if p.name < Path(path).name and p.name not in self.failed]
        return older[-1] if older else None

    def _discard(self, path: Path) -> None:
        """Rename out of the `step_*` namespace first, so a crash mid-delete never leaves a
        half-deleted directory that still looks complete."""
        trash = self.root / f".old-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest `keep_last` checkpoints of this lineage; never touch another's."""
        mine = [p for p in self.complete_checkpoints()
                if (self.read_meta(p).get("lineage") or "legacy") == self.lineage]
        for old in mine[:-self.keep_last]:
            self._discard(old)

    def check_fresh_start(self, overwrite: bool) -> None:
        """Collective, for a run started without --resume: refuse a directory holding
        checkpoints (the run would mix with them, and a later --resume would pick theirs),
        or with `overwrite` move them aside into `replaced-<run id>/`."""
        def check():
            if dist.get_rank() != 0 or not self.root.is_dir():
                return
            old = sorted(p for p in self.root.glob("step_*") if p.is_dir())
            if not old:
                return
            if not overwrite:
                raise SeqparError(
                    f"checkpoint.dir {self.root} already holds checkpoints ({', '.join(p.name for p in old[-3:])}"
                    f"{', ...' if len(old) > 3 else ''}) and this run was started without --resume. Continue "
                    f"that run with --resume, or use a new checkpoint.dir, or set checkpoint.overwrite: true "
                    f"to move them aside.")
            aside = self.root / f"replaced-{self.run_id}"
            aside.mkdir()
            for p in old + [self.root / "latest"] * (self.root / "latest").is_file():
                os.replace(p, aside / p.name)
            print(f"[seqpar] checkpoint.overwrite: moved {len(old)} earlier checkpoint(s) to {aside}", flush=True)
        raise_together(check)

    # --- saving -------------------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Collective: every rank must call it with the same step. A failed write on any
        rank (disk full, I/O error) removes the unfinished save and raises the same
        SeqparError on every rank; the previous checkpoint is untouched."""
        lifecycle.exit_if_orphaned()  # an orphan of a dead launcher must not write
        rank = dist.get_rank()
        final = self.root / self.step_name(step)
        tmp = self.root / f".tmp-{self.run_id}-{final.name}"

        def prepare():
            if rank != 0:
                return
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # This run holds the directory's lock: any leftover is from a crashed run.
                for stale in self.incomplete_checkpoints():
                    if not stale.name.startswith("step_"):
                        shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                raise SeqparError(self._write_error(final, str(tmp), e)) from None
        raise_together(prepare)
        with WriteRecorder(tmp, engine) as rec:
            engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state, save_latest=False)
            rank_file = tmp / f"rank_{rank:05d}.pt"
            rec.write(rank_file, torch.save, rank_state, rank_file)
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, {"files": rec.files, "error": None if rec.error is None else
                                         (rec.error_path, repr(rec.error)[:500], is_no_space(rec.error))})
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
        if failed:
            self._abandon(tmp, final, failed)
        def publish():
            if rank != 0:
                return
            lifecycle.exit_if_orphaned()
            try:
                files = {}
                for rep in reports:
                    files.update(rep["files"])
                for f in sorted(tmp.rglob("*")):  # written outside the checkpoint engine (rare)
                    rel = f.relative_to(tmp).as_posix()
                    if f.is_file() and rel not in files:
                        files[rel] = {"size": f.stat().st_size, HASH: hash_file(f)}
                meta = {"step": step, "world_size": dist.get_world_size(), "run_id": self.run_id,
                        "lineage": self.lineage, "hash": HASH,
                        **{k: v for k, v in client_state.items() if isinstance(v, (int, float, str))},
                        "files": files}
                _atomic_write_text(tmp / COMPLETE, json.dumps(meta))
                if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                    self._discard(final)
                os.replace(tmp, final)
                _atomic_write_text(self.root / "latest", final.name)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SeqparError(self._write_error(final, str(tmp / COMPLETE), e)) from None
            self._prune()
        raise_together(publish)
        return final

    def _abandon(self, tmp: Path, final: Path, failed: list) -> None:
        """Remove the unfinished save on rank 0, then raise one message on every rank."""
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        ranks = [r for r, _ in failed]
        path, err, no_space = failed[0][1]
        if any(e[2] for _, e in failed):
            where, free = free_bytes(self.root)
            msg = (f"{space_message(where, self._need_bytes(), free)} (writing {path} on rank(s) {ranks}). "
                   f"Checkpoint {final.name} was not saved and its unfinished files were removed; ")
        else:
            msg = f"writing checkpoint file {path} failed on rank(s) {ranks}: {err}. Its unfinished files were removed; "
        last = self.latest()
        msg += (f"the previous checkpoint {last} is intact (continue from it with --resume after fixing this)."
                if last else "no earlier checkpoint exists.")
        if any(e[2] for _, e in failed):
            msg += " Free space there or set checkpoint.dir to a larger disk."
        raise SeqparError(msg)

    def _need_bytes(self) -> int:
        last = self.latest()
        recorded = 0
        if last is not None:
            for entry in (self.read_meta(last).get("files") or {}).values():
                recorded += entry.get("size", 0) if isinstance(entry, dict) else (entry or 0)
        return max(recorded, self.expected_bytes)

    def _write_error(self, final: Path, path: str, e: OSError) -> str:
        if is_no_space(e):
            where, free = free_bytes(self.root)
            return (f"{space_message(where, self._need_bytes(), free)} (writing {path}); checkpoint "
                    f"{final.name} was not saved; the previous checkpoint {self.latest()} is intact.")
        return f"cannot write checkpoint {final.name} ({path}): {e}; check checkpoint.dir."

    # --- loading ------------------------------------------------------------------------

    def verify(self, path: Path, world_size: int | None, rank: int) -> None:
        """Raise SeqparError unless `path` is complete and every file its save wrote is
        present with its size and (checkpoint.verify: full) its checksum. In full mode the
        files are re-hashed once in the whole job, split over the ranks. world_size None:
        an elastic resume (seqpar.train.elastic) checks saved rank `rank`'s files and maps
        the ranks itself."""
        path = Path(path)
        marker = path / COMPLETE
        if not marker.is_file():
            raise SeqparError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); it was "
                              f"interrupted while saving. {self._fix(path)}")
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise SeqparError(f"{marker} is unreadable ({e}); the checkpoint is damaged. {self._fix(path)}")
        if world_size is not None and meta.get("world_size") != world_size:
            raise SeqparError(f"{path} was written by {meta.get('world_size')} ranks but this job has "
                              f"{world_size}, and it records no layout to remap (it predates elastic "
                              f"resume): resume with {meta.get('world_size')} ranks.")
        expected = dict(meta.get("files") or {})  # checkpoints from before the manifest: rank files only
        expected.setdefault(f"rank_{rank:05d}.pt", None)
        # The re-hashing is split over this job's ranks (on an elastic resume, not the saved ones).
        job_rank, job_world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        problems = check_files(path, expected, mode=self.verify_mode, rank=job_rank, world_size=job_world)
        if problems:
            raise SeqparError(f"checkpoint {path} is damaged: {'; '.join(problems)}. {self._fix(path)}")

    def _fix(self, path: Path) -> str:
        older = self._older_than(path)
        if older is None:
            return ("No older complete checkpoint exists under "
                    f"{self.root}: restore the files, or start without --resume.")
        return (f"Resume from the previous checkpoint {older}: move {path} out of {self.root} "
                f"(or delete it) and run again with --resume.")

    def _load_files(self, engine, path: Path) -> tuple[dict, dict]:
        """DeepSpeed's load and this rank's file; any error names the file being read."""
        reading = {"file": path / TAG}
        ckpt_engine = engine.checkpoint_engine
        original = ckpt_engine.load

        def tracked(file, *args, **kwargs):
            reading["file"] = Path(file)
            return original(file, *args, **kwargs)
        ckpt_engine.load = tracked
        try:
            load_path, client_state = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError("DeepSpeed found no checkpoint files")
            reading["file"] = path / f"rank_{dist.get_rank():05d}.pt"
            rank_state = torch.load(reading["file"], weights_only=False)
            if not isinstance(rank_state, dict) or not {"data", "rng"} <= set(rank_state):
                raise KeyError("the per-rank state lacks 'data' or 'rng'")
        except SeqparError:
            raise
        except Exception as e:  # noqa: BLE001 - unpickling, DeepSpeed asserts, missing keys
            first = (str(e).strip().splitlines() or [""])[0][:300].rstrip(".")
            raise SeqparError(f"checkpoint {path} could not be loaded: reading {reading['file']} failed with "
                              f"{type(e).__name__}: {first}. {self._fix(path)}") from None
        finally:
            del ckpt_engine.load
        return client_state or {}, rank_state

    def load(self, engine, path: Path | None = None) -> tuple[dict, dict]:
        """Collective. Load a complete checkpoint (default: the newest); returns
        (client_state, rank_state). Every rank verifies the checkpoint's files before
        DeepSpeed touches anything; a problem on any rank raises on every rank, and the
        checkpoint is never offered as the last good one again."""
        path = Path(path) if path else self.latest()
        if path is None:
            raise SeqparError(f"no complete checkpoint under {self.root}; start without --resume.")
        agree_on_run({"checkpoint": path.name}, what="the checkpoint to resume from")
        try:
            raise_together(self.verify, path, dist.get_world_size(), dist.get_rank())
            client_state, rank_state = raise_together(self._load_files, engine, path)
        except SeqparError:
            self.failed.add(path.name)
            raise
        self.lineage = self.read_meta(path).get("lineage") or "legacy"
        return client_state, rank_state
