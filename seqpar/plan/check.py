"""The memory check `seqpar train` runs before building the model: the planner's estimate
against what one rank has, with a warning that names what would make the run fit."""

from __future__ import annotations

import os

from ..units import GIB
from .memory import plan_for_run
import torch


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


def advice(est, cfg, kv_heads: int | None = None) -> list[str]:
    """What to change, biggest term first (each item is a config key users can --set;
    `kv_heads`: the model's K/V heads, for the head groups to suggest)."""
    out = []
    if est.activations + est.transient > est.states:
        if not cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing=true")
        if not cfg.parallel.tiled_mlp and not cfg.parallel.tiled_layer:
            out.append("parallel.tiled_mlp=8192")
        if not cfg.parallel.tiled_layer:
            out.append("parallel.tiled_layer=8192")
        if cfg.parallel.head_groups == 1 and kv_heads and kv_heads > 1:
            out.append(f"parallel.head_groups={kv_heads} (with parallel.tiled_layer; one more attention "
                       f"forward per layer)")
        out.append(f"a larger parallel.sp_size (now {cfg.parallel.sp_size})")
        if not cfg.parallel.offload_activations and cfg.model.gradient_checkpointing:
            out.append("parallel.offload_activations=true")
    else:
        out.append("ZeRO-3 (train.deepspeed_config=configs/deepspeed/zero3.json) or "
                   "configs/deepspeed/zero3_offload.json, or more GPUs")
    return out


def _kv_heads(config):
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "num_key_value_heads", None) or heads


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
             + "; ".join(advice(est, cfg, _kv_heads(config)))
             + f". See `seqpar plan --model {cfg.model.config_file or cfg.model.name_or_path} "
               f"--seq-len {cfg.train.seq_len} --gpus {world}` for every option.")
    return line, False
