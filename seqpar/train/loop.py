"""`seqpar train`: the continued-pretraining loop.

setup: distributed init -> validation -> mesh -> model (+RoPE extension) -> parallelize
-> data -> DeepSpeed engine -> resume. Each step: gradient_accumulation_steps micro
batches, each the DP rank's sequences, sharded over SP by `shard_batch`; metrics; and
checkpoints every N steps and at the end (then the optional Hugging Face export).
"""

from __future__ import annotations

import datetime
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..model import parallelize, shard_batch
from ..parallel import init_mesh
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .engine import deepspeed_config, initialize_engine, sp_loss_scale, zero_stage
from .metrics import MetricsLogger, peak_memory_gib, peak_tflops, training_flops_per_token
from .config_io import config_hash
from .model_loader import load_model, model_config, resolve_dtype
from .safety import GracefulStop, agree_on_run, check_finite, run_fingerprint


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the job however it was launched: torchrun/deepspeed env vars, or mpirun (MPI)."""
    import deepspeed

    # Also when torch.distributed is already up (tests, notebooks): DeepSpeed's comm
    # layer must be initialised over it.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    from_mpi = not dist.is_initialized() and "RANK" not in os.environ and any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    # MPI discovery sets MASTER_PORT from distributed_port: keep the one the launcher chose.
    # A dead or stuck rank fails every collective after this timeout instead of hanging.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=from_mpi, verbose=False,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


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

    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        losses = []
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = next(self.batches)
            shard = shard_batch(batch, self.mesh, layout=cfg.parallel.layout)
            shard = {k: v.to(self.engine.device) for k, v in shard.items()}
            loss = self.engine(**shard).loss
            check_finite(loss.detach(), self.step + 1)
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
                              rank_state={"data": self.batches.state_dict(), "rng": rng_state()})

    def resume(self) -> bool:
        if self.checkpoints.latest() is None:
            return False
        client, rank_state = self.checkpoints.load(self.engine)
        self.step = int(client["step"])
        self.batches.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        return True


def setup(cfg) -> Trainer:
    from ..data import BatchIterator, build_packed_dataset, load_tokenizer
    from .validate import validate_config

    init_distributed(cfg.train.dist_timeout_minutes)
    world = dist.get_world_size()
    validate_config(cfg, world)  # files, sizes, names: before anything heavy
    config = model_config(cfg)
    validate_config(cfg, world, model_config=config)
    seed_everything(cfg.train.seed)
    mesh = init_mesh(cfg.parallel.sp_size, cfg.parallel.ulysses_size)
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    ds_config = deepspeed_config(cfg, mesh.dp_size, bf16)
    model, hf_ds = load_model(cfg, ds_config, config)
    model = parallelize(model, mesh, attention=cfg.parallel.attention, layout=cfg.parallel.layout,
                        fused_rope=cfg.parallel.fused_rope, tiled_loss=cfg.parallel.tiled_loss)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    # Rank 0 tokenizes and packs first; the others then read its on-disk cache.
    if dist.get_rank() == 0:
        dataset = build_packed_dataset(cfg.data, tokenizer, cfg.train.seq_len)
    dist.barrier()
    if dist.get_rank() != 0:
        dataset = build_packed_dataset(cfg.data, tokenizer, cfg.train.seq_len)
    batches = BatchIterator(dataset, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size,
                            micro_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed)
    engine = initialize_engine(model, cfg, mesh, ds_config)
    agree_on_run(run_fingerprint(config_hash(cfg), model, mesh))
    return Trainer(cfg=cfg, mesh=mesh, model=model, engine=engine, batches=batches, tokenizer=tokenizer,
                   checkpoints=CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last),
                   hf_deepspeed_config=hf_ds, zero3=zero_stage(ds_config) == 3,
                   loss_scale=sp_loss_scale(ds_config, mesh.sp_size))


def train(cfg, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Run (or continue) training; returns the per-step metrics of this invocation.

    `stop_after` ends this invocation after that many steps (with a checkpoint) without
    changing the schedule, e.g. to fit a cluster time limit; `resume` continues it.
    """
    from .export import export_hf

    trainer = setup(cfg)
    rank0 = dist.get_rank() == 0
    if resume and trainer.resume() and rank0:
        print(f"[seqpar] resumed from {trainer.checkpoints.latest()} at step {trainer.step}", flush=True)
    logger = MetricsLogger(cfg.log.dir, cfg.train.steps, enabled=rank0, tensorboard=cfg.log.tensorboard)
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
                break
        if not history or trainer.checkpoints.latest() is None or \
                trainer.checkpoints.latest().name != CheckpointManager.step_name(trainer.step):
            trainer.save()
        if cfg.checkpoint.export_hf and trainer.step >= cfg.train.steps:
            export_hf(trainer.model, cfg.checkpoint.export_hf, trainer.tokenizer, zero3=trainer.zero3)
            if rank0:
                print(f"[seqpar] exported Hugging Face model to {cfg.checkpoint.export_hf}", flush=True)
    finally:
        stop.restore()
        logger.close()
    if rank0:
        print(f"[seqpar] done: step {trainer.step}; checkpoint {trainer.checkpoints.latest()}; "
              f"logs {cfg.log.dir}/metrics.jsonl", flush=True)
    return history
