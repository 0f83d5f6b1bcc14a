"""The JIT build of the compiled ops (seqpar/ops/_build.py) and the guards around the CUDA kernels.

- the CUDA arch list (a pure function): pre-Ampere arches dropped, visible GPUs added;
- a failed CUDA build falls back to a CPU-only build, not to pure torch;
- ninja is found when only the `ninja` package has it (not on PATH);
- two processes building at once: one builds, the other waits and loads the finished
  library (never a half-written one);
- `compiled.available()` refuses GPUs below sm_80 and head dims whose shared memory the
  GPU cannot give; the backward op rejects lse/delta of the wrong shape.

No GPU exists where this runs: the CUDA side is checked through monkeypatched device
queries here and compiled by tests/test_cuda_compile.py, never launched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seqpar.ops import _build, compiled

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not compiled.loaded(), reason="seqpar compiled ops did not build "
                               f"({_build.extension_status().reason})")


@pytest.mark.parametrize("requested, caps, want", [
    (None, [], "8.0;9.0+PTX"),                                          # no list, no GPU: the default
    ("5.2 6.0 6.1 7.0 7.5 8.0 8.6 9.0+PTX", [], "8.0;8.6;9.0+PTX"),    # an NGC container's list
    ("7.0;7.5", [(8, 6)], "8.6+PTX"),                                   # only the GPU's arch is usable
    ("8.0", [(9, 0), (8, 0), (7, 5)], "8.0;9.0+PTX"),                   # visible GPUs added, sm_75 not
    ("Ampere;Hopper", [], "8.0;8.6+PTX;9.0+PTX"),                       # torch's arch names
    ("Volta;Turing", [], "8.0;9.0+PTX"),                                # nothing usable left: the default
    ("native", [(8, 9)], "8.9+PTX"),
    ("8.0;9.0a", [(9, 0)], "8.0+PTX;9.0a"),                             # sm_90a serves a 9.0 GPU; its PTX would not
])
def test_cuda_arch_list(requested, caps, want):
    assert _build.cuda_arch_list(requested, caps) == want


def test_cuda_build_failure_retries_cpu_only(monkeypatch):
    calls = []

    def fake_load_or_build(plan, status):
        calls.append(plan.with_cuda)
        status.cuda = plan.with_cuda
        if plan.with_cuda:
            raise RuntimeError("nvcc fatal: Unsupported gpu architecture 'compute_35'")

    monkeypatch.setattr(_build, "_status", None)
    monkeypatch.setattr(_build, "_cuda_toolchain", lambda: (True, ""))
    monkeypatch.setattr(_build, "_arch_list", lambda: "8.0+PTX")
    monkeypatch.setattr(_build, "_load_or_build", fake_load_or_build)
    monkeypatch.delenv("SEQPAR_DISABLE_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to build.*compute_35.*CPU kernels only"):
        status = _build.load_extension()
    assert calls == [True, False]
    assert status.loaded and not status.cuda and status.kind == "CPU only"
    assert status.reason.startswith("ok, CPU only: the CUDA build failed") and "compute_35" in status.reason


def test_ninja_from_the_package_when_not_on_path(monkeypatch, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # e.g. an absolute venv python under Slurm
    path = _build._path_with_ninja()
    ninja = shutil.which("ninja", path=path)
    assert ninja is not None and Path(ninja).parent in {Path(d) for d in _build._ninja_dirs()}
    assert subprocess.run(["ninja", "--version"], env={"PATH": path}, capture_output=True).returncode == 0
    assert os.environ["PATH"] == str(empty)  # only the build's environment changes
    monkeypatch.setattr(_build, "_ninja_dirs", lambda: [str(empty)])
    with pytest.raises(RuntimeError, match="pip install ninja"):
        _build._path_with_ninja()


# Each process: wait for the other at a barrier, then load_extension() in a fresh cache with
# `_compile` replaced by a slow copy of this machine's real library (written in chunks, as a
# linker would), so a process that loaded before the build finished would load a torn file.
_RACER = textwrap.dedent("""
    import os, pathlib, sys, time, torch
    from seqpar.ops import _build
    real, log, barrier, me = sys.argv[1:5]

    def slow_compile(plan, staging):
        with open(log, "a") as f:
            f.write(me + "\\n")
        out, data = staging / (plan.name + ".so"), pathlib.Path(real).read_bytes()
        step = len(data) // 8 + 1
        with open(out, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step]); f.flush(); time.sleep(0.25)
        torch.ops.load_library(str(out))
        return out

    _build._compile = slow_compile
    _build._cuda_toolchain = lambda: (False, "CPU test")
    pathlib.Path(barrier, me).touch()
    while len(os.listdir(barrier)) < 2:
        time.sleep(0.01)
    status = _build.load_extension()
    q = torch.randn(1, 8, 2, 16)
    out, lse = torch.ops.seqpar.attention_fwd(q, q, q, True, 0.25)
    print(status.loaded, status.reason, status.library)
""")


@needs_ext
def test_two_processes_build_once_and_load_the_finished_library(tmp_path):
    real = _build.extension_status().library
    log, barrier = tmp_path / "compiles.log", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "SEQPAR_EXT_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(ROOT)}
    env.pop("SEQPAR_DISABLE_EXT", None)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, real, str(log), str(barrier), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        loaded, reason, library = out.split()
        assert loaded == "True" and reason == "ok"
    assert len(log.read_text().splitlines()) == 1  # the second process waited, then loaded
    lib = Path(library)
    assert lib.read_bytes() == Path(real).read_bytes()
    assert not list((lib.parent / "staging").glob("*.so"))  # published by rename


def test_a_failed_build_is_shared_with_the_processes_waiting_for_it(monkeypatch, tmp_path):
    """Ranks waiting on the lock take the failure instead of each repeating the build."""
    compiles = []

    def failing_compile(plan, staging):
        compiles.append(plan.name)
        time.sleep(0.5)
        raise RuntimeError("c++: fatal error: no input files")

    monkeypatch.setattr(_build, "_compile", failing_compile)
    plan = _build._Plan("seqpar_ops_test", tmp_path / "ext", [], False, "")
    start, errors = threading.Barrier(2), []

    def rank():
        start.wait()
        try:
            _build._load_or_build(plan, _build.ExtensionStatus())
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=rank) for _ in range(2)]  # flock also excludes threads
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert compiles == ["seqpar_ops_test"]
    assert sorted(errors) == ["c++: fatal error: no input files",
                              "the build failed in another process: RuntimeError: c++: fatal error: no input files"]
    with pytest.raises(RuntimeError, match="no input files"):  # a later process tries again
        _build._load_or_build(plan, _build.ExtensionStatus())
    assert len(compiles) == 2


@needs_ext
def test_attention_cuda_smem_bytes():
    need = torch.ops.seqpar.attention_cuda_smem_bytes
    sm86_limit = 101_376  # cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_86 / sm_89 (CUDA guide)
    assert need(64) < need(80) <= sm86_limit < need(128)
    assert 115_000 <= need(128) <= 128_000
    assert need(32) == 0  # no CUDA kernel for that head_dim


@needs_ext
@pytest.mark.parametrize("cap, optin, served", [
    ((7, 5), 65_536, set()),                                   # Turing: never
    ((8, 6), 101_376, {64, 80, "rope"}),                       # RTX 30xx / A10 / L4: not d128
    ((9, 0), 232_448, {64, 80, 128, "rope"}),                  # H100
])
def test_available_checks_capability_and_shared_memory(monkeypatch, cap, optin, served):
    cuda_status = replace(_build.extension_status(), cuda=True)
    monkeypatch.setattr(_build, "extension_status", lambda: cuda_status)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(shared_memory_per_block_optin=optin))
    dev = torch.device("cuda", 0)
    got = {d for d in (64, 80, 128) if compiled.available(dev, torch.bfloat16, head_dim=d)}
    if compiled.available(dev, torch.bfloat16, op="rope"):
        got.add("rope")
    assert got == set(served)
    assert not compiled.available(dev, torch.float32, head_dim=64)  # tensor cores: bf16/fp16 only


@needs_ext
def test_backward_rejects_bad_lse_and_delta():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g) for _ in range(3))
    out, lse = torch.ops.seqpar.attention_fwd(q, k, v, True, 0.25)
    dout = torch.randn_like(out)
    bwd = torch.ops.seqpar.attention_bwd
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    dq, _, _ = bwd(dout, q, k, v, out, lse, delta, True, 0.25)  # the valid call works
    with pytest.raises(RuntimeError, match=r"lse must be \[batch, heads, seq\]"):
        bwd(dout, q, k, v, out, lse.transpose(1, 2), delta, True, 0.25)
    with pytest.raises(RuntimeError, match="delta must have lse's shape"):
        bwd(dout, q, k, v, out, lse, delta[:, :, :4], True, 0.25)
    with pytest.raises(RuntimeError, match="delta must be floating point"):
        bwd(dout, q, k, v, out, lse, delta.long(), True, 0.25)
    with pytest.raises(RuntimeError, match="dout and out must have q's shape"):
        bwd(dout[:, :4], q, k, v, out, lse, delta, True, 0.25)


# ---------------------------------------------------------------- extended: a real build

def _path_without_ninja(farm: Path) -> str:
    """A PATH dir of links to every system tool except ninja (the compiler still needs as, ld...)."""
    farm.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(d).iterdir() if Path(d).is_dir() else ():
            link = farm / tool.name
            if not tool.name.startswith("ninja") and not link.exists():
                link.symlink_to(tool)
    return str(farm)


@pytest.mark.extended
def test_real_build_by_two_processes_without_ninja_on_path(tmp_path):
    """The real CPU build (1-2 min on 2 cores), started by two processes at once, with the
    absolute venv python and no ninja on PATH (as under Slurm): one builds, both load."""
    path = _path_without_ninja(tmp_path / "bin")
    assert shutil.which("ninja", path=path) is None
    env = {**os.environ, "PATH": path, "SEQPAR_EXT_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(ROOT)}
    for var in ("SEQPAR_DISABLE_EXT", "CXX", "VIRTUAL_ENV"):
        env.pop(var, None)
    probe = ("from seqpar.ops import _build, compiled; s = _build.load_extension();"
             "print(compiled.backend_name(), s.kind.replace(' ', '-'), s.reason)")
    procs = [subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=1200) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0 and out.split() == ["compiled-cpu", "CPU-only", "ok"], err
    assert sum(err.count("seqpar: building compiled ops") for _, err, _ in results) == 1
