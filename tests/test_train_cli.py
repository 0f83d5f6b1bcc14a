"""`seqpar train` end to end through launch/cpu_gloo.sh on 4 gloo ranks (SP=4, ZeRO-2):
resume continues bitwise, and the Hugging Face export loads with the trained weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    overrides = ["--set", "train.steps=6", "--set", "train.warmup_steps=1", "--set", "train.seq_len=256",
                 "--set", "data.max_documents=40", "--set", f"data.cache_dir={tmp / 'cache'}",
                 "--set", f"checkpoint.dir={tmp / name / 'ckpt'}", "--set", "checkpoint.every=3",
                 "--set", f"checkpoint.export_hf={tmp / name / 'hf'}", "--set", f"log.dir={tmp / name / 'logs'}"]
    proc = subprocess.run(["bash", "launch/cpu_gloo.sh", "configs/tiny_cpu_demo.yaml", *overrides, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def losses(tmp: Path, name: str) -> dict:
    lines = (tmp / name / "logs" / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    run_train(tmp, "straight")
    first = run_train(tmp, "resumed", "--stop-after", "3")
    second = run_train(tmp, "resumed", "--resume")
    return tmp, first, second


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_resume_continues_bitwise(runs):
    tmp, first, second = runs
    straight, resumed = losses(tmp, "straight"), losses(tmp, "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert straight == resumed  # exact float equality, not approximate
    assert "resumed from" in second.stdout and "step_00000003" in second.stdout
    assert not (tmp / "resumed" / "hf").exists() or (tmp / "resumed" / "hf" / "config.json").exists()
    assert straight[6] < straight[1]  # it trains


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_checkpoints_are_complete_and_pruned(runs):
    tmp, *_ = runs
    ckpt = tmp / "straight" / "ckpt"
    steps = sorted(p.name for p in ckpt.glob("step_*"))
    assert steps == ["step_00000003", "step_00000006"]  # keep_last = 2
    assert all((ckpt / s / "COMPLETE").is_file() for s in steps)
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert not list(ckpt.glob(".tmp-*"))


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_hf_export_loads_with_trained_weights(runs):
    from transformers import AutoModelForCausalLM

    tmp, *_ = runs
    exported = AutoModelForCausalLM.from_pretrained(tmp / "straight" / "hf")
    assert exported.config.rope_parameters["rope_type"] == "yarn"
    assert exported.config.max_position_embeddings == 256
    # ZeRO-2 keeps the full fp32 module weights in the checkpoint's model states.
    states = torch.load(tmp / "straight" / "ckpt" / "step_00000006" / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    trained = AutoModelForCausalLM.from_config(exported.config)
    trained.load_state_dict(states)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_mpirun_launcher_trains(tmp_path):
    pytest.importorskip("mpi4py", reason="needs the mpi extra: pip install -e '.[mpi]'")
    env = dict(os.environ, PYTHON=sys.executable, NP="2", MASTER_PORT=str(29500 + os.getpid() % 1000),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    overrides = ["--set", "parallel.sp_size=2", "--set", "train.steps=2", "--set", "train.warmup_steps=1",
                 "--set", "train.seq_len=256", "--set", "data.max_documents=40",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "checkpoint.export_hf=null", "--set", f"log.dir={tmp_path / 'logs'}"]
    proc = subprocess.run(["bash", "launch/mpirun.sh", "configs/tiny_cpu_demo.yaml", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "step 2/2" in proc.stdout
    assert "[seqpar] memory plan: ~" in proc.stdout  # the planner runs before every training run
    assert (tmp_path / "ckpt" / "step_00000002" / "COMPLETE").is_file()


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    """Clusters signal every process before preemption: finish the step, save, exit 0."""
    import time

    env = dict(os.environ, PYTHON=sys.executable)
    overrides = ["--set", "train.steps=500", "--set", "train.seq_len=256", "--set", "data.max_documents=40",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "checkpoint.every=0", "--set", "checkpoint.export_hf=null",
                 "--set", f"log.dir={tmp_path / 'logs'}"]
    proc = subprocess.Popen(["bash", "launch/cpu_gloo.sh", "configs/tiny_cpu_demo.yaml", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.time() + 300
    while "step 2/500" not in seen and time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "step 2/500" in seen, seen[-3000:]
    # cpu_gloo.sh runs torchrun as its one child; torchrun's children are the ranks.
    launcher = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(launcher) == 1, launcher
    subprocess.run(["pkill", "-TERM", "-P", launcher[0]], check=True)
    out, _ = proc.communicate(timeout=300)
    seen += out
    assert proc.returncode == 0, seen[-3000:]
    assert "stop requested" in seen
    saved = sorted((tmp_path / "ckpt").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    assert int(saved[0].name.split("_")[1]) < 500


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_zero3_trains_like_zero2_and_exports_gathered_weights(runs):
    """From the same pretrained weights, ZeRO-3 (weights partitioned at load, gathered for
    the export) trains the same model as ZeRO-2, up to float32 reduction order."""
    from transformers import AutoModelForCausalLM

    tmp, *_ = runs
    start = ["--set", "model.config_file=null", "--set", f"model.name_or_path={tmp / 'straight' / 'hf'}",
             "--set", "train.steps=2", "--set", "checkpoint.every=0"]
    run_train(tmp, "from_zero2", *start)
    run_train(tmp, "from_zero3", *start, "--set", "train.deepspeed_config=configs/deepspeed/zero3.json")
    zero2_losses, zero3_losses = losses(tmp, "from_zero2"), losses(tmp, "from_zero3")
    assert zero3_losses[1] == pytest.approx(zero2_losses[1], rel=1e-6)  # same starting model
    assert zero3_losses[2] == pytest.approx(zero2_losses[2], rel=1e-4)
    zero3 = AutoModelForCausalLM.from_pretrained(tmp / "from_zero3" / "hf")
    zero2 = AutoModelForCausalLM.from_pretrained(tmp / "from_zero2" / "hf")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = zero3(ids).logits, zero2(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.extended  # end-to-end launcher runs: the slow suite (CI's second step)
def test_staged_schedule_with_evals(tmp_path):
    """Two stages (128 then 256 tokens, its own steps and lr), stage 2 starting from stage
    1's export with RoPE re-extended, evals at each stage end; a rerun skips finished stages."""
    stages = "stages=[{train.seq_len: 128, train.steps: 3, train.lr: 0.002}, " \
             "{train.seq_len: 512, train.steps: 2, train.lr: 0.001}]"
    evals = 'eval={ppl: {lengths: "128,256", data: {sources: [stdlib], max_documents: 20}, num_sequences: 2}}'
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2")
    cmd = ["bash", "launch/cpu_gloo.sh", "configs/tiny_cpu_demo.yaml", "--set", "parallel.sp_size=2",
           "--set", "train.warmup_steps=1", "--set", "data.max_documents=40",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"checkpoint.dir={tmp_path / 'run'}",
           "--set", "checkpoint.every=0", "--set", f"log.dir={tmp_path / 'logs'}", "--set", stages, "--set", evals]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stage2 = json.loads((tmp_path / "run" / "stage2" / "hf" / "config.json").read_text())
    assert stage2["rope_parameters"]["rope_type"] == "yarn" and stage2["max_position_embeddings"] == 512
    assert stage2["rope_parameters"]["factor"] == 2.0  # 512 / the model's original 256
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "run" / stage / "eval" / "ppl.json").is_file()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2, again.stdout[-3000:]


def test_rank_ends_without_static_destructors_after_teardown(tmp_path):
    """After a finished run tore its process group down, `seqpar.cli.run` ends the process
    with os._exit (C++ teardown could abort a finished rank): the exit code is main's and
    output is flushed; interpreter-exit hooks do not run. Without a teardown: a normal exit."""
    script = ("import atexit, sys, seqpar.cli as c\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "c.torn_down = lambda: sys.argv[1] == 'torn'\n"
              "c.main = lambda: print('finished', end='') or 3\n"
              "c.run()\n")
    for mode, hooks in (("torn", False), ("kept", True)):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 3 and proc.stdout.startswith("finished"), proc.stdout + proc.stderr
        assert ("atexit ran" in proc.stdout) is hooks, (mode, proc.stdout)
