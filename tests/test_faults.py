"""Fail fast, never hang, never lose work (issue 9), proved on gloo ranks.

End to end (`launch/cpu_gloo.sh`, 2 ranks, SP=2, ZeRO-2, 6 steps, checkpoints at 3 and 6):
- a crash during a save leaves the previous checkpoint the one resumed, bit for bit;
- a checkpoint with a missing shard is refused with a clear error, on every rank;
- a rank killed mid-step ends the job non-zero at once, names the rank, leaves no
  process behind, and resuming reproduces the uninterrupted losses; a stalled rank fails
  its peers' collectives after train.dist_timeout_minutes, on subgroups too.
In spawned ranks (`run_distributed`, collecting each rank's error as its return value):
- ranks started with different configs, or whose sharded batches differ (at the first
  step, or at any step with SEQPAR_CHECK_EVERY_STEP=1), all raise "ranks disagree" fast;
- a truncated checkpoint file, a SeqparError seen by one rank only, a NaN loss on one
  rank, a diverging run (lr=1e30): the same clear error on every rank.
No production test hooks: crashes are simulated by the files a crash leaves behind, or
by a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.train.ckpt_integrity import hash_file
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/tiny_cpu_demo.yaml"
STEPS = 6
# Small and fast: 2 ranks share a 256-token sequence; checkpoints at steps 3 and 6.
BASE = {"parallel.sp_size": 2, "train.steps": STEPS, "train.warmup_steps": 1, "train.seq_len": 256,
        "data.max_documents": 40, "checkpoint.every": 3, "checkpoint.export_hf": "null"}
SHARD = "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's ZeRO-2 optimizer shard
MODEL = "state/mp_rank_00_model_states.pt"


def overrides(tmp: Path, name: str, **extra) -> list[str]:
    values = {**BASE, "data.cache_dir": tmp / "cache", "checkpoint.dir": tmp / name / "ckpt",
              "log.dir": tmp / name / "logs", **extra}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def launch(tmp: Path, name: str, *extra_args: str, start_new_session: bool = False, **extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.Popen(["bash", "launch/cpu_gloo.sh", CONFIG, *overrides(tmp, name, **extra), *extra_args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=start_new_session)


def train_cli(tmp: Path, name: str, *extra_args: str, ok: bool = True, **extra) -> tuple[int, str]:
    proc = launch(tmp, name, *extra_args, **extra)
    out, _ = proc.communicate(timeout=300)
    if ok:
        assert proc.returncode == 0, out[-5000:]
    return proc.returncode, out


def losses(log_dir: Path) -> dict:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: losses of steps 1..6, complete checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("faults")
    train_cli(tmp, "straight")
    ckpt = tmp / "straight" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000003", "step_00000006"]
    reference = losses(tmp / "straight" / "logs")
    assert sorted(reference) == list(range(1, STEPS + 1))
    return tmp, ckpt, reference


def copy_checkpoints(straight_ckpt: Path, dest: Path) -> Path:
    shutil.copytree(straight_ckpt, dest)
    return dest


# --- checkpoints ------------------------------------------------------------------------

def test_manifest_records_every_file(straight):
    _, ckpt, _ = straight
    meta = json.loads((ckpt / "step_00000006" / "COMPLETE").read_text())
    files = meta["files"]
    assert {SHARD, MODEL, "rank_00000.pt", "rank_00001.pt"} <= set(files)
    for rel, entry in files.items():
        assert (ckpt / "step_00000006" / rel).stat().st_size == entry["size"]
        assert hash_file(ckpt / "step_00000006" / rel, meta["hash"]) == entry[meta["hash"]]
    assert not list(ckpt.glob(".tmp-*")) and not list(ckpt.glob(".old-*"))


def test_crash_during_save_resumes_previous_checkpoint(straight):
    """What a crash during the step-6 save leaves behind (files a crash can leave: a
    half-written `.tmp-` directory; and, worse than a crash of ours can leave, a `step_`
    directory without its COMPLETE marker and a `latest` pointer naming it) must not be
    resumed: --resume takes step 3 and reproduces steps 4..6 exactly."""
    tmp, ckpt, reference = straight
    run = tmp / "crashed"
    ckpt_c = copy_checkpoints(ckpt, run / "ckpt")
    full = ckpt_c / "step_00000006"
    partial = ckpt_c / ".tmp-step_00000006"  # DeepSpeed had written some files, no marker yet
    shutil.copytree(full, partial)
    (partial / "COMPLETE").unlink()
    (partial / SHARD).unlink()
    with open(partial / MODEL, "r+b") as f:
        f.truncate(1000)
    unmarked = ckpt_c / "step_00000005"  # newest-looking directory, but never marked complete
    shutil.copytree(full, unmarked)
    (unmarked / "COMPLETE").unlink()
    shutil.rmtree(full)
    (ckpt_c / "latest").write_text("step_00000005")

    _, out = train_cli(tmp, "crashed", "--resume", **{"log.dir": run / "logs-resumed"})
    assert "resumed from" in out and "step_00000003 at step 3" in out, out[-3000:]
    assert "ignoring incomplete checkpoint(s)" in out and ".tmp-step_00000006" in out
    resumed = losses(run / "logs-resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {s: reference[s] for s in (4, 5, 6)}  # exact: nothing corrupt was loaded
    assert not list(ckpt_c.glob(".tmp-*"))  # the next save cleaned the crashed one
    assert (ckpt_c / "step_00000006" / "COMPLETE").is_file()
    assert (ckpt_c / "latest").read_text() == "step_00000006"


def test_missing_shard_is_a_clear_error_on_every_rank(straight):
    tmp, ckpt, _ = straight
    run = tmp / "damaged"
    ckpt_d = copy_checkpoints(ckpt, run / "ckpt")
    (ckpt_d / "step_00000006" / SHARD).unlink()
    rc, out = train_cli(tmp, "damaged", "--resume", ok=False)
    assert rc != 0
    errors = [line for line in out.splitlines() if line.startswith("seqpar: error:")]
    assert errors, out[-5000:]
    for line in errors:
        assert f"step_00000006 is damaged: {SHARD} is missing" in line
        assert f"Resume from the previous checkpoint {ckpt_d / 'step_00000003'}" in line
        assert "(on every rank)" in line
    assert "exitcode  : 2" in out, out[-3000:]  # SeqparError's exit status, not a DeepSpeed traceback
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out  # no deep library trace


class _NoEngine:
    """Stands in for the DeepSpeed engine: verification must fail before DeepSpeed is used."""

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("DeepSpeed was asked to load a damaged checkpoint")


def _collective_checks(ckpt_root: str) -> dict:
    import math

    import torch
    import torch.distributed as dist

    from seqpar.errors import SeqparError
    from seqpar.train.checkpoint import CheckpointManager
    from seqpar.train.safety import agree_on_run, check_finite, raise_together

    rank = dist.get_rank()
    found = {}

    def catch(key, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except SeqparError as e:
            found[key] = str(e)

    catch("truncated", CheckpointManager(ckpt_root).load, _NoEngine())

    def only_rank_1():
        if rank == 1:
            raise SeqparError("data file /x is missing on this node")
    catch("one_rank", raise_together, only_rank_1)
    catch("nan", check_finite, torch.tensor(math.nan if rank == 1 else 1.5), 7)
    catch("inf_grad", check_finite, torch.tensor(math.inf), 9, name="gradient norm")
    catch("fine", check_finite, torch.tensor(2.0), 1)
    catch("disagree", agree_on_run, {"seq_len": 256 * (rank + 1), "lr": 1e-3}, "the run config")
    return found


def test_truncated_file_nan_and_one_rank_errors_reach_every_rank(straight, tmp_path):
    _, ckpt, _ = straight
    ckpt_t = copy_checkpoints(ckpt, tmp_path / "ckpt")
    model = ckpt_t / "step_00000006" / MODEL
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    results = run_distributed(_collective_checks, 2, str(ckpt_t), timeout=60)
    for rank, found in enumerate(results):
        assert set(found) == {"truncated", "one_rank", "nan", "inf_grad", "disagree"}, (rank, found)
        assert f"{MODEL} has {size // 2} bytes, {size} were written" in found["truncated"]
        assert str(ckpt_t / "step_00000003") in found["truncated"]
        assert found["one_rank"] == "data file /x is missing on this node (on rank(s) [1])"
        assert "non-finite loss at step 7 on rank(s) [1]" in found["nan"]
        assert "non-finite gradient norm at step 9 on rank(s) [0, 1]" in found["inf_grad"]
        assert "ranks disagree on the run config: rank 1 has seq_len=512 but rank 0 has 256" in found["disagree"]
    assert results[0] == results[1]  # the same message on every rank


# --- mismatched runs --------------------------------------------------------------------

def _train_cfg(tmp: str, name: str, **extra):
    from seqpar.train.config_io import load_config

    values = {**BASE, "checkpoint.every": 0, "data.cache_dir": f"{tmp}/cache",
              "checkpoint.dir": f"{tmp}/{name}/ckpt", "log.dir": f"{tmp}/{name}/logs", **extra}
    return load_config(CONFIG, [f"{k}={v}" for k, v in values.items()])


def _train_expecting_error(cfg) -> tuple[str | None, float]:
    from seqpar.errors import SeqparError
    from seqpar.train.loop import train

    start = time.monotonic()
    try:
        train(cfg)
    except SeqparError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def _mismatched_configs(tmp: str) -> list:
    import torch.distributed as dist

    os.chdir(ROOT)  # the config's paths are relative to the repository root
    rank1 = dist.get_rank() == 1
    return [_train_expecting_error(_train_cfg(tmp, "mismatch", **{"train.seq_len": 512 if rank1 else 256})),
            _train_expecting_error(_train_cfg(tmp, "mismatch", **{"train.lr": 2e-3 if rank1 else 1e-3}))]


# No timing thresholds (the machine may be loaded): "fast" means the ranks raise before
# any training step, and the harness timeout is the guard against a hang.
def test_mismatched_configs_fail_fast_on_every_rank(tmp_path):
    results = run_distributed(_mismatched_configs, 2, str(tmp_path), timeout=300)
    for rank, ((seq_msg, seq_s), (lr_msg, lr_s)) in enumerate(results):
        assert seq_msg and "ranks disagree on the run config: rank 1 has train.seq_len=512 but rank 0 has 256" \
            in seq_msg, (rank, seq_msg)
        assert lr_msg and "rank 1 has train.lr=0.002 but rank 0 has 0.001" in lr_msg, (rank, lr_msg)
    assert results[0][0][0] == results[1][0][0]


def _mismatched_batches(tmp: str) -> list:
    """Configs agree but rank 1's shards are shorter (a data/sharding bug): without the
    check, ring attention's gloo exchange would abort one rank and feed the other wrong
    bytes. Rank 1 goes wrong from the first micro batch, then (second run, with
    SEQPAR_CHECK_EVERY_STEP=1) only from step 3 on."""
    import torch.distributed as dist

    import seqpar.train.loop as loop

    os.chdir(ROOT)
    real = loop.shard_batch
    calls = {"n": 0}
    bad_from = {"call": 1}

    def shard_batch(batch, mesh, layout):
        shard = real(batch, mesh, layout=layout)
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] >= bad_from["call"]:
            shard = {k: v[:, :-8] for k, v in shard.items()}
        return shard

    loop.shard_batch = shard_batch
    first = _train_expecting_error(_train_cfg(tmp, "batch1"))
    calls["n"], bad_from["call"] = 0, 5  # 2 micro batches per step: the 5th is step 3's first
    os.environ["SEQPAR_CHECK_EVERY_STEP"] = "1"
    every = _train_expecting_error(_train_cfg(tmp, "batch2"))
    return [first, every]


def test_mismatched_batch_shapes_fail_fast_on_every_rank(tmp_path):
    results = run_distributed(_mismatched_batches, 2, str(tmp_path), timeout=300)
    for rank, ((first, first_s), (every, every_s)) in enumerate(results):
        assert first and "ranks disagree on the sharded batch at step 1: rank 1 has batch.input_ids=((1, 120)," \
            in first, (rank, first)
        assert "rank 0 has ((1, 128), 'torch.int64')" in first
        assert every and "ranks disagree on the sharded batch at step 3" in every, (rank, every)
    assert [m for m, _ in results[0]] == [m for m, _ in results[1]]  # the same message on every rank


def _diverging_run(tmp: str):
    os.chdir(ROOT)
    return _train_expecting_error(_train_cfg(tmp, "diverge", **{"train.lr": 1e30}))


def test_nonfinite_loss_stops_every_rank_naming_step_and_rank(tmp_path):
    results = run_distributed(_diverging_run, 2, str(tmp_path), timeout=120)
    for message, _took in results:
        assert message and message.startswith("non-finite loss at step 2 on rank(s) [0, 1]"), message
        assert "no checkpoint exists yet: start again without --resume" in message  # not "--resume"
    assert not list((tmp_path / "diverge" / "ckpt").glob("step_*"))  # nothing non-finite was saved


# --- a rank dies ------------------------------------------------------------------------

def _stalled_peer_on_subgroup():
    import torch
    import torch.distributed as dist

    from seqpar.parallel import init_mesh
    from seqpar.runtime import init_distributed

    init_distributed(0.05)  # train.dist_timeout_minutes: 3 s
    mesh = init_mesh(2)  # the SP group is a subgroup, made after init: it must inherit 3 s
    if dist.get_rank() == 1:
        time.sleep(6)  # a stalled rank: never sends
        return None
    start = time.monotonic()
    try:
        dist.recv(torch.zeros(4), group=mesh.sp_group, group_src=1)  # what ring attention waits on
    except RuntimeError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, "received"


def test_stalled_peer_times_out_on_subgroups_too():
    """torch gives groups made after init its 30-minute default, not the job's timeout:
    a stalled rank used to hang ring attention for 30 minutes."""
    # Without the fix the receive waits 30 minutes and the harness timeout fails the test.
    (took, message), _ = run_distributed(_stalled_peer_on_subgroup, 2, timeout=120)
    assert "Timed out" in message, (took, message)


def _children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def torchrun_pid(script_pid: int) -> int:
    """cpu_gloo.sh runs torchrun as its child (launch/supervise.sh)."""
    children = _children(script_pid)
    assert len(children) == 1, children
    return children[0]


def _rank_pid(script_pid: int, rank: int) -> int:
    """The worker of torchrun (child of the launch script `script_pid`) whose environment says RANK=rank."""
    children = _children(torchrun_pid(script_pid))
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} among torchrun's children {children}")


@pytest.mark.extended  # a kill, a timeout and a resume: the slow suite keeps the main one under 15 min
def test_killed_rank_fails_job_fast_and_resume_reproduces(straight):
    tmp, _, reference = straight
    name = "killed"
    marker = str(tmp / name / "ckpt")  # unique to this run's command lines
    proc = launch(tmp, name, **{"train.dist_timeout_minutes": 0.5})
    seen = ""
    deadline = time.monotonic() + 240
    while f"step 4/{STEPS}" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert f"step 4/{STEPS}" in seen, seen[-4000:]
    victim = _rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGKILL)  # mid-step: rank 0 is already in step 5
    out, _ = proc.communicate(timeout=300)  # a hang (30-minute default timeouts) fails here
    seen += out
    assert proc.returncode != 0, seen[-4000:]
    # torchrun's summary names the dead rank as the root cause; the survivor says where it was.
    root_cause = seen.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause, seen[-3000:]
    assert "[seqpar] rank 0 failed after step" in seen and "continue with --resume" in seen
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    assert not left.strip(), f"orphaned processes: {left}"

    _, out = train_cli(tmp, name, "--resume", **{"log.dir": tmp / name / "logs-resumed"})
    assert "step_00000003 at step 3" in out
    resumed = losses(tmp / name / "logs-resumed")
    assert resumed == {s: reference[s] for s in (4, 5, 6)}
