"""What seqpar guarantees about checkpoints, proved fast (issue 17): on 2 spawned gloo
ranks with a stand-in DeepSpeed engine that writes and reads real files through the
same checkpoint-engine interface DeepSpeed uses, and in single processes.

The end-to-end fault matrix (real `launch/cpu_gloo.sh` runs: signals, SIGKILL, a full
tmpfs) is tests/test_fault_matrix.py, marked extended.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqpar.train.ckpt_integrity import HASH
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parent.parent


class _CkptEngine:
    """DeepSpeed's checkpoint-engine interface: save(state_dict, path), load(path)."""

    def __init__(self, full_on_rank=None):
        self.full_on_rank = full_on_rank

    def save(self, state_dict, path):
        import torch.distributed as dist

        if dist.get_rank() == self.full_on_rank:
            with open(path, "wb") as f:  # a partial file, as a full disk leaves it
                f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        torch.save(state_dict, path)

    def load(self, path, map_location=None):
        return torch.load(path, weights_only=False)


class _Engine:
    """Writes one shard per rank under <dir>/<tag>/, like ZeRO's optimizer partitions."""

    def __init__(self, full_on_rank=None):
        self.checkpoint_engine = _CkptEngine(full_on_rank)

    def _shard(self, root, tag):
        import torch.distributed as dist

        return Path(root) / tag / f"shard_{dist.get_rank()}.pt"

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        import torch.distributed as dist

        self._shard(save_dir, tag).parent.mkdir(exist_ok=True)
        self.checkpoint_engine.save({"w": torch.full((1000,), float(dist.get_rank()))}, self._shard(save_dir, tag))
        dist.barrier()  # DeepSpeed's own barrier at the end of a save: must still line up

    def load_checkpoint(self, path, tag, **kwargs):
        self.checkpoint_engine.load(str(self._shard(path, tag)))
        return path, {"step": int(Path(path).name.split("_")[1])}


def _rank_state():
    return {"data": {"position": 3}, "rng": {}}


def _errors(fn, *args, **kwargs):
    from seqpar.errors import SeqparError

    try:
        fn(*args, **kwargs)
    except SeqparError as e:
        return str(e)
    return None


def _guarantees(tmp: str, locked_dir: str) -> dict:
    import torch.distributed as dist

    from seqpar.train.checkpoint import CheckpointManager
    from seqpar.train.ckpt_lock import acquire_together, agree_run_id
    from seqpar.train.lifecycle import name_silent_ranks

    os.chdir(ROOT)
    rank = dist.get_rank()
    out = {}
    tmp = Path(tmp)

    # 1. A directory locked by another live run: refused on every rank (what `seqpar train`
    # does before the model is built; end to end in test_fault_matrix.py).
    out["locked"] = _errors(acquire_together, locked_dir, agree_run_id())

    # 2. Saves: manifest of exactly the files written, with checksums; pruning by lineage.
    root = tmp / "ckpt"
    mgr = CheckpointManager(root, keep_last=2, run_id="run-a")
    for step in (1, 2):
        mgr.save(_Engine(), step, {"step": step}, _rank_state())
    meta = json.loads((root / "step_00000002" / "COMPLETE").read_text())
    out["manifest"] = sorted(meta["files"])
    out["lineage"] = meta["lineage"]
    dist.barrier()
    if rank == 0:  # a checkpoint of another lineage in the same directory (older run)
        foreign = root / "step_00000000"
        foreign.mkdir()
        (foreign / "COMPLETE").write_text(json.dumps({"step": 0, "world_size": 2, "lineage": "run-x", "files": {}}))
    dist.barrier()
    mgr.save(_Engine(), 3, {"step": 3}, _rank_state())
    out["after_prune"] = sorted(p.name for p in root.glob("step_*"))

    # 3. Disk full on rank 1 while saving step 4: clear message on every rank, .tmp
    # removed, step 3 still the newest checkpoint and intact.
    out["disk_full"] = _errors(mgr.save, _Engine(full_on_rank=1), 4, {"step": 4}, _rank_state())
    out["after_disk_full"] = sorted(p.name for p in root.iterdir())
    out["step3_ok"] = _errors(mgr.verify, root / "step_00000003", 2, rank)

    # 4. A same-size bit flip in step 3: found at resume, naming the file and step 2.
    dist.barrier()
    shard1 = root / "step_00000003" / "state" / "shard_1.pt"
    if rank == 0:
        data = bytearray(shard1.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard1.write_bytes(bytes(data))
    dist.barrier()
    out["bit_flip"] = _errors(CheckpointManager(root, run_id="run-b").load, _Engine())

    # 5. The same damage with sizes-only verification reaches the loader: its error names
    # the file, and the failed checkpoint is never called the newest good one again.
    dist.barrier()
    if rank == 0:
        shard1.write_bytes(os.urandom(shard1.stat().st_size))
    dist.barrier()
    cheap = CheckpointManager(root, run_id="run-c", verify="size")
    out["load_error"] = _errors(cheap.load, _Engine())
    out["latest_after_failure"] = cheap.latest().name

    # 6. A fresh run in a directory holding checkpoints: refused; overwrite moves them aside.
    fresh = CheckpointManager(root, run_id="run-d")
    out["fresh"] = _errors(fresh.check_fresh_start, False)
    fresh.check_fresh_start(True)
    out["after_overwrite"] = sorted(p.name for p in root.iterdir())

    # 7. A peer that stops answering is named by the ranks that timed out.
    if rank == 0:
        out["silent"] = name_silent_ranks(grace_s=2.0)
    dist.barrier()
    return out


def test_checkpoint_guarantees_on_every_rank(tmp_path):
    from seqpar.train import ckpt_lock

    locked = tmp_path / "locked"
    ckpt_lock.acquire(locked, "holder-run")  # another live run (this process) holds it
    try:
        results = run_distributed(_guarantees, 2, str(tmp_path), str(locked), timeout=240)
    finally:
        ckpt_lock.release(locked)
    for rank, out in enumerate(results):
        assert out["locked"] and f"checkpoint.dir {locked} is in use by run holder-run" in out["locked"], out
        assert f"pid {os.getpid()}" in out["locked"] and "another checkpoint.dir" in out["locked"]
        assert out["manifest"] == ["rank_00000.pt", "rank_00001.pt", "state/shard_0.pt", "state/shard_1.pt"]
        assert out["lineage"] == "run-a"
        # keep_last=2 of run-a's own; run-x's step 0 untouched (pruning by name deleted it)
        assert out["after_prune"] == ["step_00000000", "step_00000002", "step_00000003"], out
        assert out["disk_full"].startswith("no space left on "), out["disk_full"]
        assert ": need ~" in out["disk_full"] and "GiB, have " in out["disk_full"]
        assert "state/shard_1.pt on rank(s) [1]" in out["disk_full"]
        assert "step_00000003 is intact" in out["disk_full"]
        assert not [n for n in out["after_disk_full"] if n.startswith(".tmp")], out["after_disk_full"]
        assert "step_00000004" not in out["after_disk_full"] and out["step3_ok"] is None
        assert f"state/shard_1.pt does not match its {HASH} checksum" in out["bit_flip"], out["bit_flip"]
        assert "Resume from the previous checkpoint" in out["bit_flip"] and "step_00000002" in out["bit_flip"]
        assert "could not be loaded: reading" in out["load_error"] and "shard_1.pt" in out["load_error"]
        assert "step_00000002" in out["load_error"], out["load_error"]
        assert out["latest_after_failure"] == "step_00000002"
        assert "already holds checkpoints" in out["fresh"] and "--resume" in out["fresh"]
        assert "checkpoint.overwrite: true" in out["fresh"]
        assert not [n for n in out["after_overwrite"] if n.startswith("step_")]
        assert "replaced-run-d" in out["after_overwrite"]
    assert results[0]["silent"] == [1]
    for key in ("locked", "disk_full", "bit_flip", "load_error", "fresh"):
        assert results[0][key] == results[1][key], key  # the same message on every rank


# --- single process ---------------------------------------------------------------------

def test_checks_before_init(tmp_path):
    from seqpar.errors import SeqparError
    from seqpar.train.config_io import load_config
    from seqpar.train.preflight import check_before_init, check_free_space

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {
        "train.dist_timeout_minutes=0": "train.dist_timeout_minutes must be a positive number",
        "train.dist_timeout_minutes=-1": "train.dist_timeout_minutes must be a positive number",
        f"checkpoint.dir={blocker}/ckpt": f"{blocker} is a file",
        f"checkpoint.export_hf={blocker}/hf": "checkpoint.export_hf=",
        f"log.dir={blocker}/logs": "log.dir=",
    }
    for override, message in cases.items():
        cfg = load_config("configs/tiny_cpu_demo.yaml", [override, f"checkpoint.dir={tmp_path}/ok"]
                          if not override.startswith("checkpoint.dir") else [override])
        with pytest.raises(SeqparError, match=None) as err:
            check_before_init(cfg)
        assert message in str(err.value), (override, str(err.value))
    with pytest.raises(SeqparError, match=r"one checkpoint needs ~.* GiB are free"):
        check_free_space(tmp_path, 1 << 60)


def test_transformers_config_errors_are_seqpar_errors(tmp_path):
    from seqpar.errors import SeqparError
    from seqpar.train.config_io import load_config
    from seqpar.train.model_loader import model_config

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 64}))
    cfg = load_config("configs/tiny_cpu_demo.yaml", [f"model.config_file={bad}"])
    with pytest.raises(SeqparError, match=f"the model config {bad} is not valid for transformers: ValueError"):
        model_config(cfg)


def test_dropping_metrics_of_steps_redone_after_resume(tmp_path):
    from seqpar.train.metrics import drop_records_after

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    drop_records_after(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl.before-step-3").is_file()


def test_launcher_children_die_with_the_launch_script(tmp_path):
    """`python -m seqpar.train.lifecycle PID -- CMD` (what launch/supervise.sh runs) dies
    with PID even when PID is SIGKILLed."""
    pidfile = tmp_path / "child.pid"
    script = (f"import subprocess, sys, os; p = subprocess.Popen([sys.executable, '-m', 'seqpar.train.lifecycle', "
              f"str(os.getpid()), '--', 'sleep', '300']); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              f"import time; time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    while time.monotonic() < deadline:  # until it has exec'd sleep
        if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep"):
            break
        time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":  # dead, waiting to be reaped by init
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the launcher outlived its launch script")


def test_verify_modes_match_the_validator():
    from seqpar.train import ckpt_integrity, validate

    assert validate.VERIFY_MODES is ckpt_integrity.VERIFY_MODES
