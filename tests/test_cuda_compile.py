"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a (compile only: no GPU needed).

CUDA code that nothing runs on CI machines must at least never stop compiling. A
successful compile of the exact same sources and flags is remembered under
~/.cache/seqpar/nvcc-check, so repeated local runs cost nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from seqpar.ops import _build

NVCC = shutil.which("nvcc") or (str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc") if cpp_extension.CUDA_HOME else None)
CU_FILES = sorted(_build.CSRC.glob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]

pytestmark = [pytest.mark.extended,  # minutes of nvcc on 2 cores: the slow suite
              pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(),
                                 reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")]


def _shim_dir(tmp: Path) -> Path:
    """CPU builds of torch ship c10/cuda headers without the generated cuda_cmake_macros.h."""
    header = tmp / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return tmp


def _flags(shim: Path) -> list[str]:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{_build.CSRC}", f"-I{shim}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return (includes + cpp_extension.COMMON_NVCC_FLAGS + _build.NVCC_FLAGS + ARCHS +
            ["-std=c++20", "-Xcompiler", "-fPIC", abi, "-DTORCH_EXTENSION_NAME=seqpar_check"])


def _key(cu: Path, flags: list[str]) -> str:
    h = hashlib.sha256(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(torch.__version__.encode())
    for f in [cu] + sorted(_build.CSRC.glob("*.h")) + sorted(_build.CSRC.glob("*.cuh")):
        h.update(f.read_bytes())
    h.update(" ".join(f for f in flags if not f.startswith("-I")).encode())
    return h.hexdigest()[:16]


def test_every_cu_file_compiles_for_sm80_and_sm90a(tmp_path):
    assert CU_FILES, f"no .cu files under {_build.CSRC}"
    flags = _flags(_shim_dir(tmp_path / "shim"))
    cache = Path(os.environ.get("SEQPAR_EXT_DIR") or Path.home() / ".cache" / "seqpar" / "ext").parent / "nvcc-check"
    cache.mkdir(parents=True, exist_ok=True)
    procs = {}
    for cu in CU_FILES:  # all files at once: nvcc is single-threaded per file
        stamp = cache / f"{cu.stem}-{_key(cu, flags)}.ok"
        if stamp.exists():
            continue
        cmd = [NVCC, "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}.o")] + flags
        procs[cu] = (stamp, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failures = []
    for cu, (stamp, proc) in procs.items():
        out, _ = proc.communicate(timeout=2400)
        if proc.returncode != 0:
            errors = [line for line in out.splitlines() if "error" in line]
            failures.append(f"{cu.name}:\n" + "\n".join(errors[:20] or out.splitlines()[-20:]))
        else:
            stamp.touch()
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
