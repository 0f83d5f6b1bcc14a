"""Elastic resume (seqpar.train.elastic): which samples a step reads does not depend on
the DP split, the resume plan keeps the global batch and seq_len unless a --set states
otherwise, and (extended) real runs resumed on 4 -> 2 ranks and SP 4 -> 2 / DP 1 -> 2
continue exactly like an uninterrupted run of the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from seqpar.data import BatchIterator
from seqpar.errors import SeqparError
from seqpar.train.config_io import load_config
from seqpar.train.elastic import Layout, plan_resume, stated_keys

from .test_train_cli import losses  # step -> loss from a run's metrics.jsonl

ROOT = Path(__file__).resolve().parent.parent


class IndexDataset:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([i])}


def steps_read(n: int, dp: int, micro: int, accumulation: int, steps: int, state=None) -> list:
    """The samples each optimizer step reads, over all DP ranks (a sorted list per step)."""
    iters = [BatchIterator(IndexDataset(n), dp_rank=r, dp_size=dp, micro_batch_size=micro, seed=3,
                           accumulation=accumulation) for r in range(dp)]
    if state:
        for it in iters:
            it.load_state_dict(state)
    out = []
    for _ in range(steps):
        read = []
        for _ in range(accumulation):
            for it in iters:
                read += next(it)["input_ids"][:, 0].tolist()
        out.append(sorted(read))
    return out, iters[0].state_dict()


def test_a_step_reads_the_same_samples_whatever_the_dp_split():
    # 11 samples, global batch 4: two steps per epoch, 3 samples skipped per epoch, for
    # every split (the epoch ends between steps, never inside one).
    expect, _ = steps_read(11, dp=1, micro=1, accumulation=4, steps=7)
    for dp, micro, accumulation in [(2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1)]:
        assert steps_read(11, dp, micro, accumulation, steps=7)[0] == expect, (dp, micro, accumulation)
    assert all(len(set(s)) == 4 for s in expect)
    assert len(set(expect[0] + expect[1])) == 8  # an epoch's steps are disjoint


def test_resume_on_another_dp_split_reads_the_next_samples():
    straight, _ = steps_read(11, dp=1, micro=1, accumulation=4, steps=6)
    for stop in (1, 2, 3):
        _, state = steps_read(11, dp=1, micro=1, accumulation=4, steps=stop)
        state = json.loads(json.dumps(state))
        resumed, _ = steps_read(11, dp=4, micro=1, accumulation=1, steps=6 - stop, state=state)
        assert resumed == straight[stop:], stop


# --- the resume plan (files only, no processes) ------------------------------------------

def fake_checkpoint(root: Path, layout: Layout, step: int = 3) -> Path:
    step_dir = root / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "COMPLETE").write_text(json.dumps({"step": step, "world_size": layout.world_size, "files": {}}))
    for rank in range(layout.world_size):
        torch.save({"data": {"epoch": 0, "position": 6, "seed": 0}, "rng": {}, "layout": asdict(layout)},
                   step_dir / f"rank_{rank:05d}.pt")
    return step_dir


SAVED = Layout(world_size=4, sp_size=4, ulysses_size=1, micro_batch_size=1, gradient_accumulation_steps=2,
               seq_len=256)


def plan(tmp_path, world, *overrides, stated=None):
    sets = [f"checkpoint.dir={tmp_path}", "train.seq_len=256", *overrides]
    cfg = load_config(ROOT / "configs" / "tiny_cpu_demo.yaml", sets)
    return plan_resume(cfg, world, stated_keys(overrides if stated is None else stated))


def test_plan_same_layout_changes_nothing(tmp_path):
    fake_checkpoint(tmp_path, SAVED)
    p = plan(tmp_path, 4)
    assert not p.changed and not p.universal and p.notices == []
    assert p.cfg.train.gradient_accumulation_steps == 2
    assert plan(tmp_path / "none", 4) is None  # nothing to resume


def test_plan_fewer_ranks_goes_through_the_universal_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, SAVED)
    p = plan(tmp_path, 2, "parallel.sp_size=2")
    assert p.changed and p.universal
    assert p.new.global_batch == SAVED.global_batch == 2 and p.cfg.train.gradient_accumulation_steps == 2
    assert "universal checkpoint" in p.notices[0] and "4 ranks (SP 4 x DP 1)" in p.notices[0]


def test_plan_sp_to_dp_keeps_the_global_batch_by_accumulating_less(tmp_path):
    """SP 4 -> 2 on the same 4 ranks makes DP 1 -> 2: without a --set of a batch key the
    checkpoint's global batch is kept (accumulation 2 -> 1), said in a notice."""
    fake_checkpoint(tmp_path, SAVED)
    p = plan(tmp_path, 4, "parallel.sp_size=2")
    assert p.changed and not p.universal  # same world: ZeRO shards fit as saved
    assert p.cfg.train.gradient_accumulation_steps == 1 and p.new.global_batch == 2
    assert any("gradient_accumulation_steps 2 -> 1 keeps the checkpoint's global batch of 2" in n for n in p.notices)


def test_plan_changes_the_global_batch_only_when_stated(tmp_path):
    fake_checkpoint(tmp_path, SAVED)
    p = plan(tmp_path, 4, "parallel.sp_size=2", "train.gradient_accumulation_steps=2")
    assert p.cfg.train.gradient_accumulation_steps == 2 and p.new.global_batch == 4
    assert any("global batch changes 2 -> 4" in n and "train.gradient_accumulation_steps" in n for n in p.notices)
    # The same numbers from the config file alone (not stated) keep the saved batch.
    p = plan(tmp_path, 4, "train.gradient_accumulation_steps=4", stated=())
    assert p.cfg.train.gradient_accumulation_steps == 2 and p.new.global_batch == 2
    # A split that cannot keep it is an error naming the way out.
    with pytest.raises(SeqparError, match=r"--set train.gradient_accumulation_steps"):
        plan(tmp_path, 4, "parallel.sp_size=1")  # DP 4 > global batch 2


def test_plan_changes_seq_len_only_when_stated(tmp_path):
    fake_checkpoint(tmp_path, SAVED)
    with pytest.raises(SeqparError, match=r"trained at seq_len 256.*--set train.seq_len=256"):
        plan(tmp_path, 4, "train.seq_len=512", stated=())
    p = plan(tmp_path, 4, "train.seq_len=512")
    assert p.new.seq_len == 512 and any("seq_len changes 256 -> 512" in n for n in p.notices)


# --- end to end (extended): real runs resumed on another layout ---------------------------

def run_train(tmp: Path, name: str, *extra: str, nproc: int = 4) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, NPROC=str(nproc))
    overrides = ["--set", "train.steps=6", "--set", "train.warmup_steps=1", "--set", "train.seq_len=256",
                 "--set", "data.max_documents=40", "--set", f"data.cache_dir={tmp / 'cache'}",
                 "--set", f"checkpoint.dir={tmp / name / 'ckpt'}", "--set", "checkpoint.every=3",
                 "--set", "checkpoint.export_hf=null", "--set", f"log.dir={tmp / name / 'logs'}"]
    proc = subprocess.run(["bash", "launch/cpu_gloo.sh", "configs/tiny_cpu_demo.yaml", *overrides, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc




@pytest.mark.extended
def test_elastic_resume_equals_an_uninterrupted_run(tmp_path):
    """SP=4 on 4 ranks (global batch 2 = micro 1 x accumulation 2), 3 steps; then
    (a) 2 ranks, SP=2: universal checkpoint; (b) 4 ranks, SP=2 x DP=2: accumulation 2 -> 1.
    Both continue like the uninterrupted 6 steps, to float reduction order."""
    run_train(tmp_path, "straight")
    run_train(tmp_path, "fewer_ranks", "--stop-after", "3")
    shutil.copytree(tmp_path / "fewer_ranks", tmp_path / "sp_to_dp")
    shrunk = run_train(tmp_path, "fewer_ranks", "--set", "parallel.sp_size=2", "--resume", nproc=2)
    split = run_train(tmp_path, "sp_to_dp", "--set", "parallel.sp_size=2", "--resume")
    straight = losses(tmp_path, "straight")
    assert "universal checkpoint (world size changed)" in shrunk.stdout
    assert (tmp_path / "fewer_ranks" / "ckpt" / "universal" / "step_00000003" / "CONVERTED").is_file()
    assert "gradient_accumulation_steps 2 -> 1 keeps the checkpoint's global batch of 2" in split.stdout
    assert "ZeRO shards as saved (same world size)" in split.stdout
    for name in ("fewer_ranks", "sp_to_dp"):
        resumed = losses(tmp_path, name)
        assert sorted(resumed) == [1, 2, 3, 4, 5, 6], name
        assert [resumed[s] for s in (1, 2, 3)] == [straight[s] for s in (1, 2, 3)]  # same first run
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (name, step)
    # A different global batch is refused unless stated, and announced when it is.
    bigger = run_train(tmp_path, "sp_to_dp", "--set", "parallel.sp_size=2", "--set", "train.steps=7",
                       "--set", "train.gradient_accumulation_steps=2", "--resume")
    assert "global batch changes 2 -> 4" in bigger.stdout
