"""The checkpoint and lifecycle fault matrix (issue 17), end to end: real
`launch/cpu_gloo.sh` runs (torchrun, 2 gloo ranks, SP=2, ZeRO-2, the tiny CPU demo model,
6 steps, checkpoints at 3 and 6), each fault done as a user, a scheduler or a full disk
would do it, and the outcome asserted from the outside (exit status, every rank's
message, the files left, the processes left, the losses of a resumed run).

Slow (about a dozen launches): marked extended. The fast proofs of the same guarantees
on spawned ranks are tests/test_checkpoint_guarantees.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from seqpar.train.ckpt_integrity import HASH, hash_file
from tests.test_faults import MODEL, SHARD, STEPS, _children, launch, losses, torchrun_pid, train_cli

pytestmark = pytest.mark.extended


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("seqpar: error:")]


def assert_on_every_rank(out: str, *needles: str) -> list[str]:
    """Each of the 2 ranks printed one `seqpar: error:` line holding every needle."""
    lines = error_lines(out)
    assert len(lines) == 2, out[-5000:]
    for line in lines:
        for needle in needles:
            assert needle in line, (needle, line)
    return lines


def read_until(proc: subprocess.Popen, text: str, timeout: float = 600) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert text in seen, seen[-4000:]
    return seen


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    train_cli(tmp, "straight")
    ckpt = tmp / "straight" / "ckpt"
    assert checkpoints(ckpt) == ["step_00000003", "step_00000006"]
    reference = losses(tmp / "straight" / "logs")
    assert sorted(reference) == list(range(1, STEPS + 1))
    return tmp, ckpt, reference


def copy_run(tmp: Path, ckpt: Path, name: str) -> Path:
    dest = tmp / name / "ckpt"
    shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns(".seqpar-lock"))
    return dest


# --- ownership ----------------------------------------------------------------------------

def test_second_run_refused_and_killed_launcher_leaves_no_orphan(tmp_path):
    """Run A owns its directory; run B on the same directory fails at once on every rank
    naming A. Then A's launcher (torchrun) is SIGKILLed: its workers die within seconds
    and no checkpoint appears after the kill (A saves every step, so an orphan would)."""
    ckpt = tmp_path / "owner" / "ckpt"
    a = launch(tmp_path, "owner", **{"train.steps": 400, "checkpoint.every": 1})
    try:
        read_until(a, "step 2/400")
        rc, out = train_cli(tmp_path, "intruder", ok=False, **{"checkpoint.dir": ckpt})
        assert rc != 0
        assert_on_every_rank(out, f"checkpoint.dir {ckpt} is in use by run ", "pid ", "another checkpoint.dir")
        assert "[seqpar] memory plan" not in out  # refused before the model was built
        assert a.poll() is None  # A goes on, untouched
        launcher = torchrun_pid(a.pid)
        workers = _children(launcher)
        assert len(workers) == 2, workers
        os.kill(launcher, signal.SIGKILL)
        deadline = time.monotonic() + 10  # N = 10 s
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if alive(w)], "workers outlived their launcher"
        after_kill = checkpoints(ckpt)
        time.sleep(5)  # an orphan saving every step would have written more by now
        assert checkpoints(ckpt) == after_kill
    finally:
        if a.poll() is None:
            a.kill()
        a.communicate(timeout=60)


def test_fresh_run_in_a_directory_with_checkpoints_is_refused(straight):
    tmp, ckpt, _ = straight
    copy = copy_run(tmp, ckpt, "fresh")
    rc, out = train_cli(tmp, "fresh", ok=False)
    assert rc != 0
    assert_on_every_rank(out, f"checkpoint.dir {copy} already holds checkpoints (step_00000003, step_00000006)",
                         "--resume", "a new checkpoint.dir", "checkpoint.overwrite: true")
    assert "[seqpar] memory plan" not in out
    assert checkpoints(copy) == ["step_00000003", "step_00000006"]


# --- integrity ----------------------------------------------------------------------------

def test_same_size_bit_flip_detected_at_resume_naming_the_file(straight):
    tmp, ckpt, _ = straight
    copy = copy_run(tmp, ckpt, "bitflip")
    model = copy / "step_00000006" / MODEL
    data = bytearray(model.read_bytes())
    for i in range(len(data) // 2, len(data) - 64, 7 * 4):  # a bit in every 7th float32 of the tail
        data[i] ^= 0x04
    model.write_bytes(bytes(data))
    rc, out = train_cli(tmp, "bitflip", "--resume", ok=False)
    assert rc != 0
    assert_on_every_rank(out, f"{MODEL} does not match its {HASH} checksum",
                         f"Resume from the previous checkpoint {copy / 'step_00000003'}")
    assert "resumed from" not in out


def test_damaged_shard_is_one_clear_error_on_every_rank(straight):
    """Random bytes of the same size in rank 1's ZeRO shard, with checksums off
    (checkpoint.verify: size) so that DeepSpeed meets the damage: the unpickling error
    becomes one message naming the file and the previous good checkpoint, on every rank."""
    tmp, ckpt, _ = straight
    copy = copy_run(tmp, ckpt, "shard")
    shard = copy / "step_00000006" / SHARD
    shard.write_bytes(os.urandom(shard.stat().st_size))
    rc, out = train_cli(tmp, "shard", "--resume", ok=False, **{"checkpoint.verify": "size"})
    assert rc != 0
    assert_on_every_rank(out, "step_00000006 could not be loaded: reading ", SHARD,
                         f"Resume from the previous checkpoint {copy / 'step_00000003'}")
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    assert "Last complete checkpoint: " not in out  # nobody calls the damaged one good


# --- signals ------------------------------------------------------------------------------

def _stop_with(tmp: Path, name: str, send) -> tuple[int, str, int]:
    """Start a run, `send` it a signal after step 1; returns (rc, output, step stopped at)."""
    proc = launch(tmp, name, start_new_session=True)
    seen = read_until(proc, f"step 1/{STEPS}")
    send(proc)
    out, _ = proc.communicate(timeout=300)
    out = seen + out
    stopped = [json.loads(line)["step"] for line in (tmp / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return proc.returncode, out, max(stopped)


def test_sigterm_to_the_launcher_exits_0_and_resumes_bitwise(straight):
    tmp, _, reference = straight
    rc, out, step = _stop_with(tmp, "term", lambda p: os.kill(p.pid, signal.SIGTERM))
    assert rc == 0, out[-4000:]
    assert "stop requested (SIGTERM/SIGINT)" in out and step < STEPS
    ckpt = tmp / "term" / "ckpt"
    assert checkpoints(ckpt)[-1] == f"step_{step:08d}"
    _, out = train_cli(tmp, "term", "--resume", **{"log.dir": tmp / "term" / "logs-resumed"})
    assert f"at step {step}" in out
    resumed = losses(tmp / "term" / "logs-resumed")
    assert resumed == {s: reference[s] for s in range(step + 1, STEPS + 1)}  # bitwise: exact floats


def test_sigterm_to_every_process_exits_0_with_a_checkpoint(straight):
    """Slurm's scancel / Ctrl-C: the script, torchrun and the workers all get the signal;
    torchrun then exits 1 on its own, and the script still ends 0 after the checkpoint."""
    tmp, _, _ = straight
    rc, out, step = _stop_with(tmp, "termall", lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert rc == 0, out[-4000:]
    assert f"stopped at step {step}; checkpoint " in out
    assert checkpoints(tmp / "termall" / "ckpt")[-1] == f"step_{step:08d}"


# --- early checks and a full disk -----------------------------------------------------------

def test_unwritable_checkpoint_dir_fails_before_step_1(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    rc, out = train_cli(tmp_path, "unwritable", ok=False, **{"checkpoint.dir": blocker / "ckpt"})
    assert rc != 0
    assert_on_every_rank(out, f"checkpoint.dir={blocker / 'ckpt'} cannot be a directory: {blocker} is a file")
    assert f"step 1/{STEPS}" not in out


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # One checkpoint of this run is ~10.6 MB: 16 MiB hold the first, not the second.
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): "
                    f"needs root and mount permission")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_at_save_is_named_and_cleaned_up(tmp_path, small_tmpfs):
    ckpt = small_tmpfs / "ckpt"
    rc, out = train_cli(tmp_path, "full", "--resume", ok=False, **{"checkpoint.dir": ckpt})
    assert f"--resume: no complete checkpoint under {ckpt} yet; starting at step 0" in out
    assert rc != 0
    lines = assert_on_every_rank(out, f"no space left on {small_tmpfs}: need ~", " GiB, have ",
                                 "GiB (writing ", f"the previous checkpoint {ckpt / 'step_00000003'} is intact")
    assert lines[0] == lines[1]
    assert not list(ckpt.glob(".tmp-*")) and checkpoints(ckpt) == ["step_00000003"]
    meta = json.loads((ckpt / "step_00000003" / "COMPLETE").read_text())
    for rel, entry in meta["files"].items():  # intact: every byte as saved
        assert hash_file(ckpt / "step_00000003" / rel, meta["hash"]) == entry[meta["hash"]], rel
