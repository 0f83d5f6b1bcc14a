"""Elastic resume: continue a checkpoint on another number of ranks or another SP/DP split.

A checkpoint records the layout that wrote it (`Layout`: world size, sp/ulysses size,
micro batch, gradient accumulation, seq_len) in every rank's state file. `--resume`
compares it with the new job's (`plan_resume`, before anything heavy is built):

- **Global batch** (sequences per optimizer step = micro_batch_size x
  gradient_accumulation_steps x DP) is kept. When DP changes, gradient accumulation is
  recomputed (SP 4 -> 2 on the same 4 ranks: DP 1 -> 2, accumulation 2 -> 1) and a notice
  says so. A different global batch happens only when stated: `--set
  train.gradient_accumulation_steps=...` or `--set train.micro_batch_size=...` on this
  command line, again with a notice. Otherwise an impossible split is an error naming the fix.
- **seq_len** is kept unless `--set train.seq_len=...` states the change (notice); an
  unstated difference is an error. A new length repacks the data, so the data position
  then keeps the fraction of the epoch read, not the exact samples.
- **Model and optimizer state.** ZeRO partitions over all DP x SP ranks (seqpar's mpu
  makes the sequence-data-parallel group the whole world), so with the same world size
  the checkpoint's shards fit any SP/DP split and load as they are. With another world
  size they go through DeepSpeed's universal checkpoint: `ds_to_universal` converts the
  step once into `checkpoint.dir/universal/step_N/` (rank 0, the others wait; or ahead of
  time with `seqpar ckpt convert`), and DeepSpeed loads it with `checkpoint.load_universal`.
- **Data position** is counted in samples of the global order read by whole steps
  (`seqpar.data.BatchIterator`), so any split with the same global batch reads exactly
  the samples an uninterrupted run would read next: none skipped, none repeated.
- **RNG**: every rank saved its own python/numpy/torch generator states; new rank r takes
  those of old rank r mod old_world_size. seqpar's ranks draw identically (same seed, no
  dropout), so that is exact; when the saved states differ (a model with dropout) a notice
  says that random streams were reassigned.

The result equals an uninterrupted run of the same global batch up to float reduction
order (tests/test_elastic.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SeqparError
from .checkpoint import TAG, CheckpointManager
from .safety import agree_on_run, raise_together
from argparse import Namespace
import numpy as np
import torch.distributed as dist

UNIVERSAL_DIR = "universal"
CONVERTED = "CONVERTED"  # marker written last in a finished universal conversion
BATCH_KEYS = ("train.gradient_accumulation_steps", "train.micro_batch_size")


@dataclass(frozen=True)
class Layout:
    """How a run is spread over ranks and batches: what a resume must match or remap."""
    world_size: int
    sp_size: int
    ulysses_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    seq_len: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.dp_size

    def describe(self) -> str:
        return (f"{self.world_size} ranks (SP {self.sp_size} x DP {self.dp_size}"
                f"{f', Ulysses {self.ulysses_size}' if self.ulysses_size > 1 else ''}), global batch "
                f"{self.global_batch} = micro {self.micro_batch_size} x accumulation "
                f"{self.gradient_accumulation_steps} x DP {self.dp_size}, seq_len {self.seq_len}")


def layout_of(cfg, world_size: int) -> Layout:
    return Layout(world_size=world_size, sp_size=cfg.parallel.sp_size, ulysses_size=cfg.parallel.ulysses_size,
                  micro_batch_size=cfg.train.micro_batch_size,
                  gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, seq_len=cfg.train.seq_len)


def rank_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / f"rank_{rank:05d}.pt"


def saved_layout(step_dir: Path) -> Layout | None:
    """The layout recorded in a checkpoint; None for checkpoints written before it was,
    or when the rank file cannot be read (the checkpoint manager's verification then
    reports the damage and names the checkpoint to use instead)."""
    try:
        state = torch.load(rank_file(step_dir, 0), weights_only=False)
    except Exception:  # noqa: BLE001 - damaged or missing: CheckpointManager.verify explains
        return None
    layout = state.get("layout") if isinstance(state, dict) else None
    return Layout(**layout) if layout else None


def stated_keys(overrides) -> frozenset:
    """The config keys a `--set KEY=VALUE` list states explicitly."""
    return frozenset(o.partition("=")[0].strip() for o in overrides or ())


@dataclass
class ResumePlan:
    cfg: object                 # the run config to use (gradient accumulation possibly recomputed)
    checkpoint: Path            # the step directory resumed from
    saved: Layout
    new: Layout
    notices: list = field(default_factory=list)

    @property
    def universal(self) -> bool:
        """ZeRO shards are laid out per world size: another one needs the universal format."""
        return self.new.world_size != self.saved.world_size

    @property
    def changed(self) -> bool:
        return self.new != self.saved


def plan_resume(cfg, world_size: int, stated=frozenset()) -> ResumePlan | None:
    """How `--resume` continues the newest complete checkpoint under cfg.checkpoint.dir
    with this job (None: nothing to resume, or a checkpoint without a recorded layout,
    which then must match as before). Pure decision: reads files, builds nothing."""
    latest = CheckpointManager(cfg.checkpoint.dir).latest()
    if latest is None:
        return None
    saved = saved_layout(latest)
    if saved is None:
        return None
    cfg = copy.deepcopy(cfg)
    notices = []
    train, sp = cfg.train, cfg.parallel.sp_size
    if train.seq_len != saved.seq_len:
        if "train.seq_len" not in stated:
            raise SeqparError(
                f"{latest} was trained at seq_len {saved.seq_len} but this run has train.seq_len "
                f"{train.seq_len}. Resume at the trained length with --set train.seq_len={saved.seq_len}, or "
                f"state the change on the command line: --set train.seq_len={train.seq_len}.")
        notices.append(f"seq_len changes {saved.seq_len} -> {train.seq_len} (stated by --set train.seq_len): "
                       "the data is repacked at the new length, so reading continues at the same fraction "
                       "of the epoch, not at the same samples")
    if sp >= 1 and world_size % sp == 0:  # otherwise validate_config names the problem
        dp = world_size // sp
        wanted = train.micro_batch_size * train.gradient_accumulation_steps * dp
        if wanted != saved.global_batch:
            said = sorted(stated & set(BATCH_KEYS))
            if said:
                notices.append(f"global batch changes {saved.global_batch} -> {wanted} sequences per step "
                               f"(stated by --set {', --set '.join(said)}; micro {train.micro_batch_size} x "
                               f"accumulation {train.gradient_accumulation_steps} x DP {dp})")
            else:
                per_micro = train.micro_batch_size * dp
                if saved.global_batch % per_micro:
                    raise SeqparError(
                        f"{latest} was trained with a global batch of {saved.global_batch} sequences per step "
                        f"({saved.describe()}); with DP {dp} (world {world_size} / sp_size {sp}) and "
                        f"micro_batch_size {train.micro_batch_size}, {per_micro} sequences per micro-step do "
                        f"not divide it. Keep it with a micro_batch_size that divides "
                        f"{saved.global_batch // dp if saved.global_batch % dp == 0 else saved.global_batch} "
                        f"per DP rank or another sp_size, or state a new global batch on the command line, "
                        f"e.g. --set train.gradient_accumulation_steps={max(1, saved.global_batch // per_micro)}.")
                accumulation = saved.global_batch // per_micro
                notices.append(f"gradient_accumulation_steps {train.gradient_accumulation_steps} -> {accumulation} "
                               f"keeps the checkpoint's global batch of {saved.global_batch} sequences with DP {dp} "
                               f"(to change the global batch, state it: --set {BATCH_KEYS[0]}=N)")
                train.gradient_accumulation_steps = accumulation
    plan = ResumePlan(cfg=cfg, checkpoint=latest, saved=saved, new=layout_of(cfg, world_size), notices=notices)
    if plan.changed:
        how = ("DeepSpeed universal checkpoint (world size changed)" if plan.universal
               else "ZeRO shards as saved (same world size)")
        notices.insert(0, f"elastic resume of {latest.name}: saved on {saved.describe()}; continuing on "
                          f"{plan.new.describe()}; model/optimizer state via {how}")
    return plan


# --- universal checkpoint ---------------------------------------------------------------

def universal_dir(step_dir: Path) -> Path:
    step_dir = Path(step_dir)
    return step_dir.parent / UNIVERSAL_DIR / step_dir.name


def is_converted(step_dir: Path) -> bool:
    return (universal_dir(step_dir) / CONVERTED).is_file()


def convert_to_universal(step_dir: Path, *, workers: int = 1, quiet: bool = False) -> Path:
    """Convert one complete step directory to DeepSpeed's universal format (single process;
    idempotent). Returns the directory to pass to `engine.load_checkpoint(dir, tag=TAG)`.

    Written to a temporary directory and renamed into place after the CONVERTED marker, so
    an interrupted conversion is never used."""

    from deepspeed.checkpoint import ds_to_universal  # deferred: deepspeed (heavy), only to convert a checkpoint

    step_dir = Path(step_dir)
    if not (step_dir / "COMPLETE").is_file():
        raise SeqparError(f"{step_dir} is not a complete checkpoint (no COMPLETE marker); convert a step_* "
                          "directory that finished saving.")
    out = universal_dir(step_dir)
    if is_converted(step_dir):
        return out
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = Namespace(input_folder=str(step_dir / TAG), output_folder=str(tmp / TAG),
                     num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                     keep_temp_folder=False, strict=True,
                     # seqpar's checkpoints carry no tensor/pipeline-parallel slicing info,
                     # which is all this state describes: DeepSpeed's default fits.
                     inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
            ds_to_universal.main(args)
    except Exception as err:  # noqa: BLE001 - any converter failure is a clear seqpar error
        shutil.rmtree(tmp, ignore_errors=True)
        raise SeqparError(f"DeepSpeed's universal conversion of {step_dir} failed: {type(err).__name__}: "
                          f"{err}. {log.getvalue()[-1500:]}") from err
    meta = {"source": step_dir.name, "source_complete": json.loads((step_dir / "COMPLETE").read_text())}
    meta.pop("files", None)
    (tmp / CONVERTED).write_text(json.dumps({k: v for k, v in meta.items()}, default=str))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    # Conversions of steps that no longer exist are dead weight.
    for other in out.parent.glob("step_*"):
        if other != out and not (step_dir.parent / other.name).is_dir():
            shutil.rmtree(other, ignore_errors=True)
    return out


def resolve_step_dir(path: Path) -> Path:
    """A step directory, or the newest complete one under a checkpoint root."""
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    latest = CheckpointManager(path).latest()
    if latest is None:
        raise SeqparError(f"{path} is neither a complete checkpoint (step_*/ with COMPLETE) nor a checkpoint "
                          "directory holding one.")
    return latest


# --- loading -----------------------------------------------------------------------------

def _rng_equal(a, b) -> bool:
    """Deep equality of saved generator states (tensors, numpy arrays, tuples, dicts)."""

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_rng_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_rng_equal(x, y) for x, y in zip(a, b))
    return a == b


def remap_rank_state(plan: ResumePlan, rank: int, dataset_len: int) -> tuple[dict, list]:
    """This rank's data position and RNG states in the new layout; notices."""
    notices = []
    source = rank % plan.saved.world_size
    state = torch.load(rank_file(plan.checkpoint, source), weights_only=False)
    if rank == 0:
        first = state["rng"]
        others = (torch.load(rank_file(plan.checkpoint, r), weights_only=False)["rng"]
                  for r in range(1, plan.saved.world_size))
        if not all(_rng_equal(first, o) for o in others):
            notices.append("the saved ranks' random generator states differ (dropout or other random layers); "
                           f"new rank r continues old rank r mod {plan.saved.world_size}'s streams")
    data = dict(state["data"])
    if plan.new.seq_len != plan.saved.seq_len:
        # Same fraction of the epoch, rounded down to a whole step of the new layout.
        step = plan.new.global_batch
        fraction = data["position"] * plan.saved.seq_len / plan.new.seq_len
        data["position"] = min(int(fraction) // step * step, dataset_len)
    return {**state, "data": data}, notices


def load(engine, plan: ResumePlan, checkpoints: CheckpointManager, dataset_len: int) -> tuple[dict, dict]:
    """Collective: load `plan.checkpoint` into an engine of the new layout (its DeepSpeed
    config built with `deepspeed_config_for(plan, ...)`). Returns (client_state, rank_state)."""


    rank = dist.get_rank()
    path = plan.checkpoint
    agree_on_run({"checkpoint": path.name}, what="the checkpoint to resume from")
    raise_together(checkpoints.verify, path, None, rank % plan.saved.world_size)
    load_dir = path
    if plan.universal:
        if rank == 0 and not is_converted(path):
            print(f"[seqpar] converting {path} to DeepSpeed's universal checkpoint format "
                  f"({universal_dir(path)}); for a large model run `seqpar ckpt convert {path}` ahead of time",
                  flush=True)
        raise_together(lambda: convert_to_universal(path, quiet=True) if rank == 0 else None)
        load_dir = universal_dir(path)
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise SeqparError(f"DeepSpeed could not load {load_dir / TAG}; the checkpoint is damaged.")
    rank_state, notices = remap_rank_state(plan, rank, dataset_len)
    for notice in notices:
        print(f"[seqpar] {notice}", flush=True)
    return client_state or {}, rank_state


def deepspeed_config_for(plan: ResumePlan | None, ds_config: dict) -> dict:
    """The DeepSpeed config, told to read universal checkpoints when the plan needs one."""
    if plan is not None and plan.universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return ds_config


def layout_state(cfg, world_size: int) -> dict:
    """What `Trainer.save` adds to every rank's state file."""
    return asdict(layout_of(cfg, world_size))


__all__ = ["Layout", "ResumePlan", "convert_to_universal", "deepspeed_config_for", "is_converted", "layout_of",
           "layout_state", "load", "plan_resume", "remap_rank_state", "resolve_step_dir", "saved_layout",
           "stated_keys", "universal_dir"]
