"""Builds and loads the compiled seqpar ops (csrc/) with ninja, once per machine.

`load_extension()` JIT-compiles csrc/ with `torch.utils.cpp_extension.load` at first use
and loads it into the process (the ops appear as `torch.ops.seqpar.*`). The build lives
in `$SEQPAR_EXT_DIR` (default ~/.cache/seqpar/ext) under a name keyed by the torch
version, the CUDA arch list and a hash of the sources, so a later process just loads
the finished library and a source edit rebuilds.

CPU only when torch has no CUDA or no CUDA toolchain is found; CPU+CUDA otherwise, for
the archs of `cuda_arch_list()`: `TORCH_CUDA_ARCH_LIST` without the pre-Ampere entries the
kernels cannot serve, plus every visible GPU's arch. When the CUDA build fails, the CPU
kernels are built alone (one warning). If nothing compiles, seqpar falls back to the
pure-torch kernels with one warning; `SEQPAR_REQUIRE_EXT=1` makes that an error and
`SEQPAR_DISABLE_EXT=1` skips the extension entirely.

Ranks of one job share the cache: the build runs under a file lock in the build dir and
the library is published by an atomic rename, so no process ever loads a half-written
`.so`; a build that fails while others wait hands them its error instead of being
repeated once per rank. ninja is run from PATH by `cpp_extension`; the ninja of the `ninja` package or of
the interpreter's scripts dir is put on PATH for the build (an absolute venv python, as
under Slurm, does not have it there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SeqparError

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("ops.cpp", "attention_cpu.cpp", "rope_cpu.cpp")
CUDA_SOURCES = ("attention_cuda.cu", "rope_cuda.cu")
HEADERS = ("common.h", "rope.h", "cuda_utils.cuh", "attention_cuda_tiles.h")
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200 when no GPU is visible to ask
MIN_CUDA_CAPABILITY = (8, 0)  # the kernels' bf16 WMMA needs sm_80 (Ampere) or later
# TORCH_CUDA_ARCH_LIST names (as torch.utils.cpp_extension spells them) of Ampere and later;
# older names expand to nothing the kernels can serve.
_NAMED_ARCHS = {"Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
                "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX"}
_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")
CFLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


@dataclass
class ExtensionStatus:
    """What `load_extension()` did: `backend` is 'compiled-cpu', 'compiled-cuda' or 'torch'."""

    loaded: bool = False
    cuda: bool = False
    arch_list: str = ""
    build_dir: str = ""
    library: str = ""
    reason: str = "not attempted"
    build_seconds: float | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if not self.loaded:
            return "none (pure-torch fallback)"
        return "CPU+CUDA" if self.cuda else "CPU only"


_lock = threading.Lock()
_status: ExtensionStatus | None = None


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _cuda_toolchain() -> tuple[bool, str]:
    """(build CUDA?, why not) — needs a CUDA torch and nvcc from CUDA_HOME."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    from torch.utils import cpp_extension  # deferred: imports setuptools, needed only to build
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return False, "no CUDA toolchain (nvcc) found; set CUDA_HOME"
    return True, ""


def cuda_arch_list(requested: str | None, device_caps: list[tuple[int, int]]) -> str:
    """The arch list to build for: `requested` (TORCH_CUDA_ARCH_LIST syntax) without arches
    below 8.0, plus each device capability >= 8.0, sorted, the newest with +PTX.

    NGC containers list pre-Ampere arches, which the WMMA bf16 kernels cannot compile for;
    a list lacking a visible GPU's arch would build fine and fail at launch. Names torch
    knows (Ampere, Hopper, ...) expand; other unknown entries are dropped. Nothing left:
    DEFAULT_CUDA_ARCHS.
    """
    text = (requested or "").strip()
    if text == "native":  # torch's spelling of "the visible GPUs", which are added below
        text = ""
    for named, expansion in _NAMED_ARCHS.items():  # combined names first, as torch does
        text = re.sub(rf"(?<![\w+]){re.escape(named)}(?![\w+])", expansion, text)
    arches: dict[tuple[int, int, str], bool] = {}  # (major, minor, suffix) -> +PTX
    for token in re.split(r"[;,\s]+", text):
        m = _ARCH.match(token)
        if m and (int(m[1]), int(m[2])) >= MIN_CUDA_CAPABILITY:
            key = (int(m[1]), int(m[2]), m[3])
            arches[key] = arches.get(key, False) or bool(m[4])
    for cap in device_caps:
        if tuple(cap) >= MIN_CUDA_CAPABILITY and not any(k[:2] == tuple(cap) for k in arches):
            arches[(cap[0], cap[1], "")] = False
    if not arches:
        return cuda_arch_list(DEFAULT_CUDA_ARCHS, [])
    keys = sorted(arches)
    if not any(arches.values()):  # PTX of the newest arch lets a newer GPU JIT the kernels
        portable = [k for k in keys if not k[2]]  # sm_90a-style PTX runs on that arch only
        arches[(portable or keys)[-1]] = True
    return ";".join(f"{a}.{b}{sfx}{'+PTX' if arches[(a, b, sfx)] else ''}" for a, b, sfx in keys)


def _arch_list() -> str:
    caps = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), caps)


def _source_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def ext_root() -> Path:
    return Path(os.environ.get("SEQPAR_EXT_DIR") or Path.home() / ".cache" / "seqpar" / "ext")


@dataclass(frozen=True)
class _Plan:
    name: str
    build_dir: Path
    sources: list[Path]
    with_cuda: bool
    archs: str

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"


def _plan(with_cuda: bool) -> _Plan:
    """Module name, build dir, sources and arch list for this torch, machine and choice."""
    names = list(CPU_SOURCES) + (list(CUDA_SOURCES) if with_cuda else [])
    sources = [CSRC / n for n in names]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise SeqparError(f"seqpar sources missing: {missing}. Install seqpar from its repository "
                          "(pip install -e .) so csrc/ is present, or set SEQPAR_DISABLE_EXT=1.")
    headers = [CSRC / n for n in HEADERS if (CSRC / n).exists()]
    archs = _arch_list() if with_cuda else ""
    key = "|".join([torch.__version__, str(torch.version.cuda), archs, " ".join(CFLAGS + NVCC_FLAGS),
                    _source_hash(sources + headers)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}-{digest}"
    return _Plan(f"seqpar_ops_{digest}", ext_root() / tag, sources, with_cuda, archs)


def _build(status: ExtensionStatus) -> str:
    """Loads (building if needed) CPU+CUDA, or CPU only; returns the status reason."""
    with_cuda, _ = _cuda_toolchain()
    try:
        _load_or_build(_plan(with_cuda), status)
        return "ok"
    except Exception as e:
        if not with_cuda:
            raise
        # An nvcc or arch problem must not cost the CPU kernels: build those alone.
        why = _last_line(e)
        warnings.warn(f"seqpar: the CUDA kernels failed to build ({why}); building the CPU kernels only. "
                      "SEQPAR_EXT_VERBOSE=1 shows the build log.", RuntimeWarning, stacklevel=4)
    _load_or_build(_plan(False), status)
    return f"ok, CPU only: the CUDA build failed ({why})"


def _load_or_build(plan: _Plan, status: ExtensionStatus) -> None:
    """Loads plan.library, building it first (once per machine, under a lock) if absent."""
    status.cuda, status.arch_list, status.build_dir = plan.with_cuda, plan.archs, str(plan.build_dir)
    status.sources = [p.name for p in plan.sources]
    status.library = str(plan.library)
    if plan.library.exists():  # complete whenever it exists: it is published by rename
        torch.ops.load_library(str(plan.library))
        return
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    failed = plan.build_dir / "build.failed"  # "<attempt id>\n<error>" of the last failed build
    seen = failed.read_text() if failed.exists() else None
    with _file_lock(plan.build_dir / "build.lock"):
        if plan.library.exists():  # another process built it while this one waited
            torch.ops.load_library(str(plan.library))
            return
        if failed.exists() and (last := failed.read_text()) != seen:
            # It failed while this process waited (the other ranks of one job): share the
            # outcome instead of repeating a failing build once per rank.
            raise RuntimeError(f"the build failed in another process: {last.split(chr(10), 1)[-1]}")
        staging = plan.build_dir / "staging"
        staging.mkdir(exist_ok=True)
        # cpp_extension's own lock file; one left by a killed build would hang ninja's
        # caller forever. Under our lock nobody else can be building here.
        (staging / "lock").unlink(missing_ok=True)
        what = f"CPU+CUDA (archs {plan.archs})" if plan.with_cuda else "CPU only"
        print(f"seqpar: building compiled ops ({what}) in {plan.build_dir}; first time only, "
              f"a minute or two on few cores...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            built = _compile(plan, staging)
        except Exception as e:
            failed.write_text(f"{os.getpid()}-{time.time_ns()}\n{_last_line(e)}")
            raise
        os.replace(built, plan.library)
        failed.unlink(missing_ok=True)
        status.build_seconds = time.perf_counter() - t0
    print(f"seqpar: built compiled ops in {status.build_seconds:.0f} s", file=sys.stderr, flush=True)


def _compile(plan: _Plan, staging: Path) -> Path:
    """Builds the library into `staging` with cpp_extension (which also loads it); returns its path."""
    from torch.utils import cpp_extension  # deferred: imports setuptools, needed only to build

    env = {"PATH": _path_with_ninja()}
    if plan.with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = plan.archs
    with _environ(env):
        built = cpp_extension.load(
            name=plan.name, sources=[str(s) for s in plan.sources], build_directory=str(staging),
            extra_cflags=CFLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(CSRC)],
            with_cuda=plan.with_cuda, is_python_module=False, verbose=_env_on("SEQPAR_EXT_VERBOSE"))
    return Path(built)  # the library's path, as cpp_extension named it


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock on `path`: one build per build dir across processes (and ranks)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Sets environment variables for the duration of the block, then restores them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ninja_dirs() -> list[str]:
    """Where a pip-installed ninja lives: the `ninja` package's BIN_DIR, the interpreter's scripts dir."""
    dirs = []
    try:
        import ninja  # deferred: optional build tool, absent where nothing is compiled
        if getattr(ninja, "BIN_DIR", None):
            dirs.append(str(ninja.BIN_DIR))
    except ImportError:
        pass
    dirs += [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    return dirs


def _path_with_ninja() -> str:
    """PATH with a ninja on it: cpp_extension runs `ninja` from PATH, not the Python module."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=path):
        return path
    for d in _ninja_dirs():
        if d and shutil.which("ninja", path=d):
            return os.pathsep.join([d, path]) if path else d
    raise RuntimeError("ninja not found on PATH nor next to the interpreter; pip install ninja")


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"


def load_extension() -> ExtensionStatus:
    """Build (first time) and load the compiled ops; never raises unless SEQPAR_REQUIRE_EXT=1."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        status = ExtensionStatus()
        if _env_on("SEQPAR_DISABLE_EXT"):
            status.reason = "disabled by SEQPAR_DISABLE_EXT=1"
        else:
            try:
                status.reason = _build(status)
                status.loaded = True
            except Exception as e:  # a compiler, ninja or loader failure: fall back to torch
                status.loaded = False
                status.reason = _last_line(e)
                if _env_on("SEQPAR_REQUIRE_EXT"):
                    _status = status
                    raise SeqparError(
                        f"seqpar compiled ops failed to build/load ({status.reason}); "
                        "SEQPAR_REQUIRE_EXT=1 forbids the pure-torch fallback. Install a C++ compiler "
                        "and ninja, or unset SEQPAR_REQUIRE_EXT.") from e
                warnings.warn(
                    f"seqpar: compiled ops unavailable ({status.reason}); using the pure-torch "
                    "kernels. Set SEQPAR_REQUIRE_EXT=1 to make this an error, SEQPAR_EXT_VERBOSE=1 "
                    "to see the build log.", RuntimeWarning, stacklevel=2)
        _status = status
        return status


def extension_status() -> ExtensionStatus:
    """The status of the last `load_extension()` (not attempted yet: loaded=False)."""
    return _status if _status is not None else ExtensionStatus()
