"""The planner applied to a run config: `plan_for_run` turns a `RunConfig` (+ its DeepSpeed
JSON) into the planner's shapes, and `memory_report` is the check `seqpar train` runs
before building the model: the estimate against what one rank has, with a warning that
names what would make the run fit. (`seqpar.plan` itself knows only shapes.)"""

from __future__ import annotations

import os

import torch

from ..plan.memory import DS_PREFETCH_BUCKET, DS_REDUCE_BUCKET, MemoryEstimate, ModelShape, RunShape, estimate
from ..units import GIB
from .engine import load_deepspeed_config
from .model_loader import model_config


def rank_capacity(device: str) -> int | None:
    """Bytes one rank can use: its GPU's memory, or host memory / ranks on this host."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    return total // max(1, local)


def advice(est, cfg) -> list[str]:
    """What to change, biggest term first (each item is a config key users can --set)."""
    out = []
    if est.activations + est.transient > est.states:
        if not cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing=true")
        if not cfg.parallel.tiled_mlp and not cfg.parallel.tiled_layer:
            out.append("parallel.tiled_mlp=8192")
        if not cfg.parallel.tiled_layer:
            out.append("parallel.tiled_layer=8192")
        out.append(f"a larger parallel.sp_size (now {cfg.parallel.sp_size})")
        if not cfg.parallel.offload_activations and cfg.model.gradient_checkpointing:
            out.append("parallel.offload_activations=true")
    else:
        out.append("ZeRO-3 (train.deepspeed_config=configs/deepspeed/zero3.json) or "
                   "configs/deepspeed/zero3_offload.json, or more GPUs")
    return out


def memory_report(cfg, world: int, config, device: str) -> tuple[str, bool]:
    """(one-line summary, fits) for rank 0 to print before the model is built."""
    est = plan_for_run(cfg, world, device=device, config=config)
    capacity = rank_capacity(device)
    line = (f"[seqpar] memory plan: ~{est.total / GIB:.1f} GiB per rank (parameters "
            f"{est.parameters / GIB:.1f}, optimizer {est.optimizer / GIB:.1f}, gradients "
            f"{est.gradients / GIB:.1f}, activations {est.activations / GIB:.1f}, transient "
            f"{est.transient / GIB:.1f}, comm {est.comm_buffers / GIB:.1f}; peak at {est.peak_moment})")
    if capacity is None:
        return line, True
    line += f" of {capacity / GIB:.1f} GiB"
    if est.total <= capacity:
        return line, True
    line += ("\n[seqpar] warning: this run is predicted NOT to fit in memory; try "
             + "; ".join(advice(est, cfg))
             + f". See `seqpar plan --model {cfg.model.config_file or cfg.model.name_or_path} "
               f"--seq-len {cfg.train.seq_len} --gpus {world}` for every option.")
    return line, False


def plan_for_run(cfg, world: int, *, device: str = "cuda", plain_transformers: bool = False,
                 config=None) -> MemoryEstimate:
    """The estimate for a seqpar run config (`seqpar.train.config.RunConfig`) on `world` ranks."""
    ds = load_deepspeed_config(cfg.train.deepspeed_config)
    zero = ds.get("zero_optimization", {})
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    run = RunShape(
        seq_len=cfg.train.seq_len, world=world, sp_size=cfg.parallel.sp_size,
        ulysses_size=cfg.parallel.ulysses_size, attention=cfg.parallel.attention,
        zero=int(zero.get("stage", 0)), dtype=dtype, micro_batch=cfg.train.micro_batch_size,
        offload_optimizer=_offloads(zero.get("offload_optimizer")),
        offload_params=_offloads(zero.get("offload_param")),
        gradient_checkpointing=cfg.model.gradient_checkpointing, tiled_mlp=cfg.parallel.tiled_mlp,
        tiled_layer=cfg.parallel.tiled_layer, grad_accum_dtype=_grad_accum_dtype(ds),
        offload_activations=cfg.parallel.offload_activations, tiled_loss=cfg.parallel.tiled_loss,
        plain_transformers=plain_transformers,
        reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)), device=device)
    return estimate(ModelShape.from_config(config or model_config(cfg)), run)


def _grad_accum_dtype(ds: dict) -> str | None:
    name = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def _offloads(section) -> bool:
    return bool(section) and section.get("device", "none") not in (None, "none")
