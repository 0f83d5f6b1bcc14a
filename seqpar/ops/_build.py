"""Builds and loads the compiled seqpar ops (csrc/) with ninja, once per machine.

`load_extension()` JIT-compiles csrc/ with `torch.utils.cpp_extension.load` at first use
and loads it into the process (the ops appear as `torch.ops.seqpar.*`). The build lives
in `$SEQPAR_EXT_DIR` (default ~/.cache/seqpar/ext) under a name keyed by the torch
version, the CUDA arch list and a hash of the sources, so a later process just loads
the finished library and a source edit rebuilds.

CPU only when torch has no CUDA or no CUDA toolchain is found; CPU+CUDA otherwise, for
the visible GPUs' archs (or `TORCH_CUDA_ARCH_LIST`). If nothing compiles, seqpar falls
back to the pure-torch kernels with one warning; `SEQPAR_REQUIRE_EXT=1` makes that an
error and `SEQPAR_DISABLE_EXT=1` skips the extension entirely.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
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
HEADERS = ("common.h", "rope.h", "cuda_utils.cuh")
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200 when no GPU is visible to ask
CFLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


@dataclass
class ExtensionStatus:
    """What `load_extension()` did: `backend` is 'compiled-cpu', 'compiled-cuda' or 'torch'."""

    loaded: bool = False
    cuda: bool = False
    arch_list: str = ""
    build_dir: str = ""
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
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return False, "no CUDA toolchain (nvcc) found; set CUDA_HOME"
    return True, ""


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCHS


def _source_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def ext_root() -> Path:
    return Path(os.environ.get("SEQPAR_EXT_DIR") or Path.home() / ".cache" / "seqpar" / "ext")


def _plan() -> tuple[str, Path, list[Path], bool, str]:
    """(module name, build dir, sources, with_cuda, arch list) for this torch and machine."""
    with_cuda, _ = _cuda_toolchain()
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
    name = f"seqpar_ops_{digest}"
    tag = f"torch{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}-{digest}"
    return name, ext_root() / tag, sources, with_cuda, archs


def _build(status: ExtensionStatus) -> None:
    from torch.utils import cpp_extension

    name, build_dir, sources, with_cuda, archs = _plan()
    status.cuda, status.arch_list, status.build_dir = with_cuda, archs, str(build_dir)
    status.sources = [p.name for p in sources]
    lib = build_dir / f"{name}.so"
    if lib.exists():  # built before for exactly these sources: load, skip ninja
        torch.ops.load_library(str(lib))
        return
    if shutil.which("ninja") is None and not _ninja_module():
        raise RuntimeError("ninja not found; pip install ninja")
    build_dir.mkdir(parents=True, exist_ok=True)
    what = f"CPU+CUDA (archs {archs})" if with_cuda else "CPU only"
    print(f"seqpar: building compiled ops ({what}) in {build_dir}; first time only, "
          f"a minute or two on few cores...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        cpp_extension.load(
            name=name, sources=[str(s) for s in sources], build_directory=str(build_dir),
            extra_cflags=CFLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(CSRC)],
            with_cuda=with_cuda, is_python_module=False, verbose=_env_on("SEQPAR_EXT_VERBOSE"))
    finally:
        if with_cuda:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    status.build_seconds = time.perf_counter() - t0
    print(f"seqpar: built compiled ops in {status.build_seconds:.0f} s", file=sys.stderr, flush=True)


def _ninja_module() -> bool:
    try:
        import ninja  # noqa: F401  (pip's ninja puts the binary next to the interpreter)
        return True
    except ImportError:
        return False


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
                _build(status)
                status.loaded, status.reason = True, "ok"
            except Exception as e:  # a compiler, ninja or loader failure: fall back to torch
                status.loaded = False
                status.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
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
