"""Multi-node launches executed end to end on one machine acting as a small cluster
(tests/cluster/setup.sh): the DeepSpeed launcher over pdsh/ssh with a two-host hostfile,
torchrun with two agents and a c10d rendezvous, Slurm sbatch with requeue and SIGTERM,
and mpirun over two hosts. Every run trains the same 4-rank job (SP=4, ZeRO-2, gloo) and
must give bitwise the losses of the single-node launch/cpu_gloo.sh run of that config.

Extended suite (`bash tests/run.sh -m extended`): each launch costs a process start-up
of torch + DeepSpeed per rank. Needs root and apt for the packages (else skipped, saying
why); torchrun needs nothing but this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, cpu_env, free_port

pytestmark = pytest.mark.extended

CONFIG = "configs/tiny_cpu_demo.yaml"
STEPS = 8


def overrides(run: Path, tmp: Path) -> list[str]:
    return ["--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=1", "--set", "train.seq_len=256",
            "--set", "data.max_documents=40", "--set", f"data.cache_dir={tmp / 'cache'}",
            "--set", f"checkpoint.dir={run / 'ckpt'}", "--set", "checkpoint.every=2",
            "--set", "checkpoint.export_hf=null", "--set", f"log.dir={run / 'logs'}"]


def losses(run: Path) -> dict:
    """step -> loss; a step logged twice (re-run after a resume) keeps its last value."""
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def reference(work) -> dict:
    """The single-node run: launch/cpu_gloo.sh, 4 ranks on this machine."""
    run = work / "reference"
    check(subprocess.run(["bash", "launch/cpu_gloo.sh", CONFIG, *overrides(run, work)], cwd=ROOT,
                         env=cpu_env(NPROC="4"), capture_output=True, text=True, timeout=900))
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1]
    return got


# --- DeepSpeed launcher: hostfile, pdsh over ssh, .deepspeed_env ----------------------------

@pytest.mark.timeout(1800)
def test_deepspeed_hostfile_two_nodes_over_pdsh(ssh_cluster, reference, work):
    """2 hosts x 2 CPU ranks from a hostfile through launch/deepspeed.sh: train, checkpoint,
    stop, resume (a second launch), and the losses of the single-node run."""
    run = work / "deepspeed"
    env_file = work / "deepspeed_env"  # what ./.deepspeed_env holds on a real cluster
    env_file.write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\nCUDA_VISIBLE_DEVICES=\n")
    env = cpu_env(HOSTFILE=ssh_cluster["HOSTFILE"], MASTER_PORT=str(free_port()), DS_ENV_FILE=str(env_file))
    env["PATH"] = f"{ssh_cluster['PATH_PREPEND']}:{env['PATH']}"  # ssh = ssh -F <test ssh config>
    launch = ["bash", "launch/deepspeed.sh", CONFIG, *overrides(run, work)]
    first = check(subprocess.run([*launch, "--stop-after", "4"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=900))
    second = check(subprocess.run([*launch, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=900))
    for out in (first, second):
        assert "pdsh" in out and "nnodes=2, num_local_procs=2, node_rank=1" in out
        assert "127.0.0.2: " in out and "localhost: " in out  # pdsh prefixes each host's lines
        assert "export GLOO_SOCKET_IFNAME=lo" in out  # .deepspeed_env reached the remote command
    assert "resumed from" in second and "step_00000004" in second
    assert losses(run) == reference


# --- torchrun: two agents, c10d rendezvous (what slurm.sbatch runs on each node) ----------

def test_torchrun_two_agents_c10d_rendezvous(reference, work):
    run = work / "torchrun"
    env = cpu_env(NNODES="2", NPROC="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="seqpar-test")
    agents = [subprocess.Popen(["bash", "launch/torchrun.sh", CONFIG, *overrides(run, work)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=900)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n=====\n".join(o[-4000:] for o in outs)
    assert all("--nnodes 2" in o and "--rdzv-backend c10d" in o for o in outs)
    assert sum("[seqpar] done: step 8" in o for o in outs) == 1  # global rank 0 lives in one agent
    assert losses(run) == reference


# --- Slurm: sbatch, requeue, SIGTERM + resubmit --------------------------------------------

def slurm_env(slurm_cluster: dict) -> dict:
    # The batch job inherits this environment (sbatch --export=ALL, the default).
    return cpu_env(SLURM_CONF=slurm_cluster["SLURM_CONF"], GPUS_PER_NODE="4")


def sbatch(run: Path, work: Path, env: dict, *extra: str, options=()) -> str:
    """Submit launch/slurm.sbatch for this machine (1 node, 4 CPU ranks); the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=30", "--job-name=seqpar-test",
           "--cpus-per-task=1", f"--output={run}/job-%j.out", *options,
           "launch/slurm.sbatch", CONFIG, *overrides(run, work), *extra]
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_field(job: str, env: dict, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait_job(job: str, env: dict, timeout: float = 900) -> str:
    """Wait until the job has finished; its final state (COMPLETED, FAILED, CANCELLED...)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job, env, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"Slurm job {job} did not finish in {timeout} s")


def wait_for_text(path: Path, text: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}:\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.is_file() else '(no file)'}")


@pytest.mark.timeout(1200)
def test_slurm_sbatch_runs_to_completion(slurm_cluster, reference, work):
    env = slurm_env(slurm_cluster)
    run = work / "slurm"
    job = sbatch(run, work, env)
    assert wait_job(job, env) == "COMPLETED", (run / f"job-{job}.out").read_text()[-4000:]
    out = (run / f"job-{job}.out").read_text()
    assert "slurm.sbatch: 1 nodes x 4 GPUs" in out and "[seqpar] done: step 8" in out
    assert losses(run) == reference


@pytest.mark.timeout(1800)
def test_slurm_requeue_resumes_bitwise(slurm_cluster, reference, work):
    """`scontrol requeue` kills the running job and queues it again with the same
    arguments; slurm.sbatch sees SLURM_RESTART_COUNT and continues with --resume."""
    env = slurm_env(slurm_cluster)
    run = work / "slurm_requeue"
    job = sbatch(run, work, env, options=["--requeue"])
    wait_for_text(run / f"job-{job}.out", "step 3/8")
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    # Slurm holds a requeued job ~2 min (reason BeginTime); let it start as soon as it is pending.
    deadline = time.time() + 300
    while job_field(job, env, "JobState") != "PENDING" and time.time() < deadline:
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    assert wait_job(job, env) == "COMPLETED", (run / f"job-{job}.out").read_text()[-4000:]
    assert job_field(job, env, "Restarts") == "1"
    out = (run / f"job-{job}.out").read_text()  # the requeued run's output
    assert "requeued job (restart 1): continuing with --resume" in out and "resumed from" in out
    assert losses(run) == reference


@pytest.mark.timeout(1800)
def test_slurm_sigterm_then_resubmit_with_resume(slurm_cluster, reference, work):
    """`scancel --signal=TERM` (what a preemption or a time limit sends first): the ranks
    finish the step, checkpoint and stop; a resubmission with --resume continues bitwise."""
    env = slurm_env(slurm_cluster)
    run = work / "slurm_sigterm"
    job = sbatch(run, work, env)
    wait_for_text(run / f"job-{job}.out", "step 3/8")
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    wait_job(job, env)
    first = (run / f"job-{job}.out").read_text()
    assert "stop requested (SIGTERM/SIGINT)" in first, first[-4000:]
    stopped = max(losses(run))
    assert stopped < STEPS and (run / "ckpt" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    again = sbatch(run, work, env, "--resume")
    assert wait_job(again, env) == "COMPLETED", (run / f"job-{again}.out").read_text()[-4000:]
    assert f"resumed from {run / 'ckpt' / f'step_{stopped:08d}'}" in (run / f"job-{again}.out").read_text()
    assert losses(run) == reference


# --- mpirun over two hosts (MPICH hydra, ssh) ---------------------------------------------

@pytest.mark.timeout(1200)
def test_mpirun_two_hosts(ssh_cluster, reference, work):
    pytest.importorskip("mpi4py", reason="needs the mpi extra: pip install -e '.[mpi]'")
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip(f"no mpirun next to {sys.executable} (the mpi extra brings MPICH's)")
    run = work / "mpirun"
    env = cpu_env(NP="4", MASTER_PORT=str(free_port()), MPIRUN=str(mpirun),
                  MPIRUN_ARGS=f"-hosts {ssh_cluster['HOSTS']} -ppn 2 -launcher ssh")
    env["PATH"] = f"{ssh_cluster['PATH_PREPEND']}:{env['PATH']}"
    # Hydra forks the ranks of the local host and starts the other host's over ssh.
    where = check(subprocess.run([str(mpirun), "-np", "4", "-hosts", ssh_cluster["HOSTS"], "-ppn", "2", "-launcher",
                                  "ssh", "sh", "-c", 'echo "rank $PMI_RANK ssh=[$SSH_CONNECTION]"'],
                                 env=env, capture_output=True, text=True, timeout=120))
    assert sum(" 127.0.0.2 " in line for line in where.splitlines() if "ssh=[" in line) == 2, where
    out = check(subprocess.run(["bash", "launch/mpirun.sh", CONFIG, *overrides(run, work)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=900))
    assert "[seqpar] done: step 8" in out
    assert losses(run) == reference
