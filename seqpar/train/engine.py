"""DeepSpeed engine for a parallelized model: config, optimizer, schedule, initialize.

The DeepSpeed JSON holds ZeRO/offload settings only; batch sizes, clipping and
precision come from the run config so there is one source of truth. The seqpar `mpu`
tells DeepSpeed the DP and SP groups: ZeRO partitions over all DP x SP ranks and
averages gradients so that SP=N trains exactly like SP=1 on the same global batch.
"""

from __future__ import annotations

import math

import torch

from ..errors import SeqparError
from ..plan.memory import load_deepspeed_config


def deepspeed_config(cfg, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON completed from the run config."""
    ds = load_deepspeed_config(cfg.train.deepspeed_config)
    train = cfg.train
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    ds["train_batch_size"] = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
    ds["gradient_clipping"] = float(train.grad_clip or 0.0)
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 1 << 30)  # seqpar prints its own progress
    ds.setdefault("wall_clock_breakdown", False)
    if bf16:
        ds["bf16"] = {"enabled": True}
    if zero_stage(ds) == 3:
        # One reduction path only, so `sp_loss_scale` below is always the right fix.
        ds["zero_optimization"]["reduce_scatter"] = True
    return ds


def sp_loss_scale(ds: dict, sp_size: int) -> float:
    """Factor to multiply the loss by before `engine.backward`.

    Each SP rank's gradient is a partial sum (the SP sum is the true gradient), so the
    right reduction is sum over SP, mean over DP. DeepSpeed 0.19's ZeRO-1/2 do that
    (they divide by world / sp_size); ZeRO-3's reduce-scatter path divides by the whole
    world, i.e. returns 1/sp_size of the gradient (tests/test_train_equivalence.py
    shows it). Scaling the loss by sp_size there gives the exact gradient.
    """
    return float(sp_size) if zero_stage(ds) == 3 else 1.0


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(model, train) -> torch.optim.Optimizer | None:
    """A torch optimizer (DeepSpeed wraps it), or None to use the DeepSpeed JSON's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "deepspeed":
        return None
    raise SeqparError(f"unknown train.optimizer {train.optimizer!r}; choose adamw, sgd or deepspeed.")


def lr_lambda(train):
    """Linear warmup to lr, then cosine decay to min_lr at the last step (as a factor of lr)."""
    warmup, total = train.warmup_steps, max(1, train.steps)
    floor = train.min_lr / train.lr if train.lr else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def initialize_engine(model, cfg, mesh, ds_config: dict):
    import deepspeed  # deferred: deepspeed (heavy), only when an engine is built

    optimizer = build_optimizer(model, cfg.train)
    kwargs = dict(model=model, config=ds_config, mpu=mesh.mpu())
    if optimizer is None:
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    else:
        kwargs["optimizer"] = optimizer
        kwargs["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    return engine
