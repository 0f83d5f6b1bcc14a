"""What a checkpoint save wrote, and whether the bytes on disk are still those bytes.

While DeepSpeed saves, `WriteRecorder` stands between it and its checkpoint engine:
every file the engine writes is recorded by the rank that wrote it, with its size and
digest (xxh3_128, or BLAKE2b without xxhash) taken right after the write (from the page cache, before any other
process could touch it). A write that fails (disk full, I/O error) is recorded instead
of raised, so DeepSpeed's own barriers still line up on every rank and the failure can
be raised on all ranks together. The manifest is the union of what every rank
recorded: the exact files this save meant to write, not whatever is on disk later.

`check_files` re-hashes files against the manifest ("full") or compares sizes only
("size"): the full check reads every byte once, split over the ranks.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
import shutil

VERIFY_MODES = ("full", "size")


def _hashers() -> dict:
    """Digest factories by the name a manifest records. xxh3_128 (xxhash, which `datasets`
    already requires) is ~10x faster than BLAKE2b here (README); BLAKE2b is the fallback
    and still verifies manifests written with it."""
    found = {"blake2b": lambda: hashlib.blake2b(digest_size=32)}
    try:
        import xxhash  # deferred: optional xxhash, blake2b without it

        found["xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    return found


HASHERS = _hashers()
HASH = "xxh3_128" if "xxh3_128" in HASHERS else "blake2b"  # what new saves record


def hash_file(path: str | Path, algorithm: str = HASH) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASHERS[algorithm]).hexdigest()


def is_no_space(err: BaseException) -> bool:
    """Disk full, as the OS says it (ENOSPC, EDQUOT) or as torch's zip writer does."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


class WriteRecorder:
    """Context manager around one rank's part of a save into `root` (a directory)."""

    def __init__(self, root: Path, engine=None):
        self.root = Path(root)
        self.engine = engine
        self.files: dict[str, dict] = {}  # relative path -> {"size", HASH: digest}
        self.error: BaseException | None = None
        self.error_path: str | None = None
        self._patched = []

    def record(self, path: str | Path) -> None:
        path = Path(path)
        self.files[path.relative_to(self.root).as_posix()] = {"size": path.stat().st_size, HASH: hash_file(path)}

    def write(self, target: str | Path, write_fn, *args, **kwargs):
        """Run `write_fn` (which writes `target`) and record the file, or record the error."""
        if self.error is not None:
            return None  # after one failure nothing else is written: the save is abandoned
        try:
            result = write_fn(*args, **kwargs)
            self.record(target)
            return result
        except Exception as e:  # noqa: BLE001 - raised together on every rank by the caller
            self.error, self.error_path = e, str(target)
            return None

    def _patch(self, obj, name: str, wrapper) -> None:
        original = getattr(obj, name)
        self._patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, wrapper(original))

    def __enter__(self):
        if self.engine is None:
            return self
        ckpt_engine = self.engine.checkpoint_engine
        def saver(save):
            def run(*args, **kwargs):  # save(state_dict, path), by position or keyword
                path = kwargs["path"] if "path" in kwargs else args[1]
                return self.write(path, save, *args, **kwargs)
            return run
        self._patch(ckpt_engine, "save", saver)
        if hasattr(self.engine, "_copy_recovery_script"):
            # DeepSpeed copies zero_to_fp32.py with shutil on rank 0, outside its engine.
            def recovery(copy):
                def run(save_path):
                    target = Path(save_path) / "zero_to_fp32.py"
                    return self.write(target, copy, save_path)
                return run
            self._patch(self.engine, "_copy_recovery_script", recovery)
        return self

    def __exit__(self, *exc):
        for obj, name, previous in reversed(self._patched):
            if previous is None:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        self._patched.clear()
        return False


def check_files(root: Path, files: dict, *, mode: str, rank: int, world_size: int) -> list[str]:
    """Problems with `files` (manifest entries) under `root`. Every rank checks that each
    file exists with its size; in "full" mode rank r also re-hashes files r, r+W, ... of
    the sorted list (each file is read once in the whole job)."""
    problems = []
    for index, (rel, entry) in enumerate(sorted(files.items())):
        size = entry.get("size") if isinstance(entry, dict) else entry  # older manifests: size only
        algorithm = next((a for a in HASHERS if isinstance(entry, dict) and a in entry), None)
        digest = entry.get(algorithm) if algorithm else None
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif size is not None and f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
        elif mode == "full" and digest and index % world_size == rank and hash_file(f, algorithm) != digest:
            problems.append(f"{rel} does not match its {algorithm} checksum (its bytes changed after the save)")
    return problems


def free_bytes(path: Path) -> tuple[Path, int]:
    """(the mount point of the file system `path` is, or would be, on; bytes free there)."""

    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path, free
