"""`seqpar train`: the continued-pretraining loop.

setup: file-system checks -> distributed init -> validation -> checkpoint dir lock ->
free space -> data -> mesh -> model (+RoPE extension) -> parallelize -> DeepSpeed engine
-> resume: what can fail on bad input fails before the model is built. Each step:
gradient_accumulation_steps micro batches, each the DP rank's sequences, sharded over SP
by `shard_batch`; metrics; and checkpoints every N steps and at the end (then the
optional Hugging Face export).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..data import BatchIterator, build_packed_dataset, load_tokenizer
from ..errors import SeqparError
from ..model import enable_checkpointing, parallelize, shard_batch
from ..ops import set_attention_kernel
from ..parallel import init_mesh
from ..plan.check import memory_report
from . import elastic, lifecycle
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .ckpt_lock import acquire_together, agree_run_id
from .export import export_hf
from .engine import deepspeed_config, initialize_engine, sp_loss_scale, zero_stage
from .metrics import MetricsLogger, peak_memory_gib, peak_tflops, training_flops_per_token
from .config_io import config_hash, dump_config
from ..runtime import init_distributed, resolve_dtype
from .model_loader import load_model, model_config
from .preflight import check_before_init, check_free_space, estimate_checkpoint_bytes
from .safety import (RESUME_ADVICE, GracefulStop, agree_on_run, batch_fingerprint, check_every_step,
                     check_finite, config_fingerprint, raise_together, run_fingerprint)
from .validate import validate_before_init, validate_config


def shutdown_distributed() -> None:
    """Tear the process group down before the interpreter exits. Left to static
    destructors, the communication threads can abort a rank that finished its work
    ("terminate called without an active exception"), and a good run exits non-zero."""
    global _TORN_DOWN
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _TORN_DOWN = True


_TORN_DOWN = False


def torn_down() -> bool:
    """Whether `shutdown_distributed` ended this process's process group (see `seqpar.cli.run`)."""
    return _TORN_DOWN


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Trainer:
    cfg: object
    mesh: object
    model: object
    engine: object
    batches: object
    tokenizer: object
    checkpoints: CheckpointManager
    hf_deepspeed_config: object
    zero3: bool
    loss_scale: float = 1.0  # see engine.sp_loss_scale
    step: int = 0
    batch_checked: bool = False  # shard shapes/dtypes agreed on (once; every step with SEQPAR_CHECK_EVERY_STEP=1)
    resume_plan: object = None  # elastic.ResumePlan when resuming on another layout

    def resume_advice(self) -> str:
        if self.checkpoints.latest() is None:
            return "no checkpoint exists yet: start again without --resume once it is fixed"
        return RESUME_ADVICE

    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        losses = []
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = next(self.batches)
            shard = shard_batch(batch, self.mesh, layout=cfg.parallel.layout)
            if not self.batch_checked or check_every_step():
                # Shards of different lengths would make ring attention's exchanges mismatch:
                # gloo aborts one rank and can leave another with wrong numbers.
                agree_on_run(batch_fingerprint(shard), what=f"the sharded batch at step {self.step + 1}")
                self.batch_checked = True
            shard = {k: v.to(self.engine.device) for k, v in shard.items()}
            loss = self.engine(**shard).loss
            check_finite(loss.detach(), self.step + 1, advice=self.resume_advice())
            self.engine.backward(loss * self.loss_scale)
            self.engine.step()
            losses.append(loss.detach().float())
        # Every SP rank holds the same loss; average over DP ranks for the log.
        mean_loss = torch.stack(losses).mean()
        dist.all_reduce(mean_loss, group=self.mesh.dp_group)
        mean_loss = (mean_loss / self.mesh.dp_size).item()
        elapsed = time.perf_counter() - start
        tokens = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * self.mesh.dp_size
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            check_finite(torch.as_tensor(float(grad_norm)), self.step + 1, name="gradient norm",
                         advice=self.resume_advice())
        metrics = {"loss": mean_loss, "lr": self.engine.get_lr()[0],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "peak_mem_gib": peak_memory_gib()}
        if torch.cuda.is_available():
            flops = training_flops_per_token(self.model.config, cfg.train.seq_len) * tokens
            metrics["tflops"] = flops / elapsed / dist.get_world_size() / 1e12  # per GPU
            peak = peak_tflops()
            metrics["mfu"] = metrics["tflops"] / peak if peak else None
        self.step += 1
        return metrics

    def save(self) -> None:
        self.checkpoints.save(self.engine, self.step, client_state={"step": self.step},
                              rank_state={"data": self.batches.state_dict(), "rng": rng_state(),
                                          "layout": elastic.layout_state(self.cfg, dist.get_world_size())})

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        # Collective from here on: all ranks must take the same branch (and checkpoint).
        agree_on_run({"resume_from": latest.name if latest else None}, what="the checkpoint to resume from")
        if latest is None:
            if dist.get_rank() == 0:
                print(f"[seqpar] --resume: no complete checkpoint under {self.checkpoints.root} yet; "
                      f"starting at step 0", flush=True)
            return False
        partial = self.checkpoints.incomplete_checkpoints()
        if partial and dist.get_rank() == 0:
            print(f"[seqpar] ignoring incomplete checkpoint(s) from an interrupted save: "
                  f"{', '.join(p.name for p in partial)}", flush=True)
        plan = self.resume_plan
        if plan is not None and plan.changed and plan.checkpoint == latest:
            client, rank_state = elastic.load(self.engine, plan, self.checkpoints, len(self.batches.dataset))
        else:
            client, rank_state = self.checkpoints.load(self.engine)
        self.step = int(client["step"])
        self.batches.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        return True


def _print_memory_plan(cfg, world: int, config) -> None:
    """The planner's estimate, and a warning with fixes when the run should not fit.
    A planner failure never stops training: it only costs the warning."""

    try:
        line, _ = memory_report(cfg, world, config, "cuda" if torch.cuda.is_available() else "cpu")
    except Exception as err:  # noqa: BLE001
        line = f"[seqpar] memory plan unavailable ({type(err).__name__}: {err})"
    print(line, flush=True)


def _build_data(cfg, tokenizer):
    """Any data failure (not just seqpar's own checks) as one SeqparError, so it can be
    raised on every rank together instead of killing one rank mid-collective."""

    try:
        return build_packed_dataset(cfg.data, tokenizer, cfg.train.seq_len)
    except SeqparError:
        raise
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:400]
        raise SeqparError(f"preparing the data (data.sources={cfg.data.sources}) failed: {type(e).__name__}: "
                          f"{first}; fix data.* in the config.") from None


def setup(cfg, resume: bool = False, stated=frozenset()) -> Trainer:

    check_before_init(cfg)  # timeout, directories writable: before any process group exists
    validate_before_init(cfg)  # numbers, names, sizes, RoPE: a typo fails before the slow init
    init_distributed(cfg.train.dist_timeout_minutes)
    world = dist.get_world_size()
    # First collective: every rank must run the same config, or later collectives mismatch.
    agree_on_run({"world_size": world, **config_fingerprint(dump_config(cfg))}, what="the run config")
    # Resuming on another layout may keep the checkpoint's global batch by another accumulation.
    plan = raise_together(elastic.plan_resume, cfg, world, stated) if resume else None
    if plan is not None:
        cfg = plan.cfg
        if dist.get_rank() == 0:
            for notice in plan.notices:
                print(f"[seqpar] {notice}", flush=True)
    # A problem seen by one rank only (e.g. a file missing on its node) stops every rank.
    raise_together(validate_config, cfg, world)  # files, sizes, names: before anything heavy
    # The directory is this run's before anything is written into it.
    run_id = agree_run_id()
    acquire_together(cfg.checkpoint.dir, run_id)
    config = raise_together(model_config, cfg)
    raise_together(validate_config, cfg, world, model_config=config)
    checkpoint_bytes = estimate_checkpoint_bytes(cfg, config)
    checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last, run_id=run_id,
                                    verify=cfg.checkpoint.verify, expected_bytes=checkpoint_bytes)
    if not resume:
        checkpoints.check_fresh_start(cfg.checkpoint.overwrite)
    raise_together(check_free_space, cfg.checkpoint.dir, checkpoint_bytes)
    if dist.get_rank() == 0:
        _print_memory_plan(cfg, world, config)
    seed_everything(cfg.train.seed)
    set_attention_kernel(cfg.parallel.attention_kernel)
    # Data before the model: a bad source fails in seconds, on every rank.
    tokenizer = raise_together(load_tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)
    # Rank 0 tokenizes and packs first; the others then read its on-disk cache.
    dataset = raise_together(lambda: _build_data(cfg, tokenizer) if dist.get_rank() == 0 else None)
    dataset = raise_together(lambda: dataset if dist.get_rank() == 0 else _build_data(cfg, tokenizer))
    mesh = init_mesh(cfg.parallel.sp_size, cfg.parallel.ulysses_size)
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    ds_config = elastic.deepspeed_config_for(plan, deepspeed_config(cfg, mesh.dp_size, bf16))
    model, hf_ds = load_model(cfg, ds_config, config)
    model = parallelize(model, mesh, attention=cfg.parallel.attention, layout=cfg.parallel.layout,
                        fused_rope=cfg.parallel.fused_rope, tiled_loss=cfg.parallel.tiled_loss,
                        tiled_mlp=cfg.parallel.tiled_mlp, offload_activations=cfg.parallel.offload_activations,
                        tiled_layer=cfg.parallel.tiled_layer, head_groups=cfg.parallel.head_groups,
                        loss_chunk=cfg.parallel.loss_chunk)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    batches = BatchIterator(dataset, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size,
                            micro_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed,
                            accumulation=cfg.train.gradient_accumulation_steps)
    engine = initialize_engine(model, cfg, mesh, ds_config)
    agree_on_run(run_fingerprint(config_hash(cfg), model, mesh))
    return Trainer(cfg=cfg, mesh=mesh, model=model, engine=engine, batches=batches, tokenizer=tokenizer,
                   checkpoints=checkpoints,
                   hf_deepspeed_config=hf_ds, zero3=zero_stage(ds_config) == 3,
                   loss_scale=sp_loss_scale(ds_config, mesh.sp_size), resume_plan=plan)


def _report_failure(e: Exception, trainer) -> None:
    """The survivors of a dead or hung peer see only a backend error (connection reset,
    timed out); say where this rank was and how to go on. The launcher's summary
    (torchrun) names the rank that died first."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    silent = lifecycle.name_silent_ranks() if lifecycle.is_timeout(e) else None
    who = (f"rank(s) {silent} stopped answering (hung or dead: they never reported this timeout)"
           if silent else "if a peer rank died or hung, this rank's collectives fail too; the "
           "launcher's summary names the rank that failed first")
    print(f"[seqpar] rank {dist.get_rank()} failed after step {trainer.step}: {type(e).__name__}: "
          f"{first}\n[seqpar] {who}. Last complete checkpoint: "
          f"{trainer.checkpoints.latest()}; continue with --resume.", file=sys.stderr, flush=True)


def train(cfg, resume: bool = False, stop_after: int | None = None, stated=frozenset()) -> list[dict]:
    """Run (or continue) training; returns the per-step metrics of this invocation.

    `stop_after` ends this invocation after that many steps (with a checkpoint) without
    changing the schedule, e.g. to fit a cluster time limit; `resume` continues it, on the
    same or another layout (`elastic`); `stated`: the config keys given by --set, the
    only way to change the global batch or seq_len at a resume.
    """

    trainer = setup(cfg, resume=resume, stated=stated)
    cfg = trainer.cfg
    rank0 = dist.get_rank() == 0
    if resume and trainer.resume() and rank0:
        print(f"[seqpar] resumed from {trainer.checkpoints.latest()} at step {trainer.step}", flush=True)
    logger = MetricsLogger(cfg.log.dir, cfg.train.steps, enabled=rank0, tensorboard=cfg.log.tensorboard,
                           start_step=trainer.step)
    history = []
    stop = GracefulStop()
    try:
        last = cfg.train.steps if stop_after is None else min(cfg.train.steps, trainer.step + stop_after)
        while trainer.step < last:
            metrics = trainer.train_step()
            history.append({"step": trainer.step, **metrics})
            if trainer.step % max(1, cfg.log.every) == 0 or trainer.step == cfg.train.steps:
                logger.log(trainer.step, metrics)
            every = cfg.checkpoint.every
            if every and trainer.step % every == 0 and trainer.step < last:
                trainer.save()
            if stop.should_stop(trainer.engine.device):
                if rank0:
                    print(f"[seqpar] stop requested (SIGTERM/SIGINT): checkpointing step {trainer.step} "
                          f"and exiting; continue with --resume", flush=True)
                stop.stopped = True
                break
        if not history or trainer.checkpoints.latest() is None or \
                trainer.checkpoints.latest().name != CheckpointManager.step_name(trainer.step):
            trainer.save()
        if stop.stopped and rank0:
            lifecycle.report_stop(trainer.step, trainer.checkpoints.latest())
        if cfg.checkpoint.export_hf and trainer.step >= cfg.train.steps:
            export_hf(trainer.model, cfg.checkpoint.export_hf, trainer.tokenizer, zero3=trainer.zero3)
            if rank0:
                print(f"[seqpar] exported Hugging Face model to {cfg.checkpoint.export_hf}", flush=True)
    except Exception as e:
        if not isinstance(e, SeqparError):  # those are already clear and raised on every rank
            _report_failure(e, trainer)
        raise
    finally:
        stop.restore()
        logger.close()
    if rank0:
        print(f"[seqpar] done: step {trainer.step}; checkpoint {trainer.checkpoints.latest()}; "
              f"logs {cfg.log.dir}/metrics.jsonl", flush=True)
    return history
