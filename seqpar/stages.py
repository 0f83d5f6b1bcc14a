"""Staged length schedules: e.g. 8K -> 32K -> 128K, each stage with its own steps and
learning rate, one after the other in the same job.

Stage k writes its checkpoints under `checkpoint.dir/stage{k}`, exports a Hugging Face
model there, optionally runs the configured evals, and stage k+1 starts from that
export (its RoPE extended again to the new length from the model's original length).
A finished stage (export present) is skipped, so `--resume` continues where a job died.
Every stage is validated before the first one starts.

Layer: above both train/ and eval/ (a stage trains, then evaluates its export); train/
never imports eval/.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch.distributed as dist

from .errors import SeqparError
from .eval.cli import run_evals
from .eval_config import EvalConfig
from .parallel import init_mesh
from .runtime import init_distributed
from .train.config_io import apply_override
from .train.lifecycle import die_with_launcher
from .train.loop import train
from .train.preflight import check_before_init
from .train.validate import check_eval_section, validate_before_init, validate_config


def stage_configs(cfg) -> list:
    """One RunConfig per stage (just `cfg` when no stages are configured)."""
    if not cfg.stages:
        return [cfg]
    stages = []
    previous_export = None
    for index, overrides in enumerate(cfg.stages, start=1):
        if not isinstance(overrides, dict) or not overrides:
            raise SeqparError(f"stages[{index - 1}] must be a mapping of overrides such as "
                              f"{{train.seq_len: 32768, train.steps: 500}}; got {overrides!r}.")
        stage = copy.deepcopy(cfg)
        stage.stages, stage.eval = [], EvalConfig()  # evals run from cfg.eval after each stage
        for key, value in overrides.items():
            apply_override(stage, f"{key}={json.dumps(value)}")
        root = Path(cfg.checkpoint.dir) / f"stage{index}"
        stage.checkpoint.dir = str(root / "checkpoints")
        stage.checkpoint.export_hf = str(root / "hf")
        stage.log.dir = str(Path(cfg.log.dir) / f"stage{index}")
        if previous_export:
            stage.model.name_or_path, stage.model.config_file = previous_export, None
        previous_export = stage.checkpoint.export_hf
        stages.append(stage)
    return stages


def validate_stages(stages, world_size: int, validate) -> None:
    """Validate every stage up front. Later stages start from exports that do not exist
    yet, so their model source is checked as the first stage's (same architecture)."""
    for index, stage in enumerate(stages):
        check = copy.deepcopy(stage)
        if index:
            check.model = copy.deepcopy(stages[0].model)
        try:
            validate(check, world_size)
        except SeqparError as err:
            raise SeqparError(f"stage {index + 1}: {err}" if len(stages) > 1 else str(err)) from None


def run_stages(cfg, *, resume: bool = False, stop_after: int | None = None, stated=frozenset()) -> None:
    die_with_launcher()  # an orphaned worker must never go on training and writing checkpoints
    check_eval_section(cfg)  # stages run cfg.eval after each one; their own eval is empty
    stages = stage_configs(cfg)
    for stage in stages:  # before any process group exists: a bad timeout or directory fails here
        check_before_init(stage)
    # Config typos too: in a second, not after DeepSpeed's distributed init.
    validate_stages(stages, None, lambda stage, _world: validate_before_init(stage))
    init_distributed(cfg.train.dist_timeout_minutes)
    validate_stages(stages, dist.get_world_size(), validate_config)
    for index, stage in enumerate(stages, start=1):
        done = len(stages) > 1 and (Path(stage.checkpoint.export_hf) / "config.json").is_file()
        if done:
            if dist.get_rank() == 0:
                print(f"[seqpar] stage {index}/{len(stages)} already finished: {stage.checkpoint.export_hf}", flush=True)
            continue
        if dist.get_rank() == 0 and len(stages) > 1:
            print(f"[seqpar] stage {index}/{len(stages)}: seq_len {stage.train.seq_len}, "
                  f"{stage.train.steps} steps, lr {stage.train.lr}", flush=True)
        history = train(stage, resume=resume, stop_after=stop_after, stated=stated)
        if stage.train.steps > (history[-1]["step"] if history else 0) and len(stages) > 1:
            return  # stopped early (--stop-after / SIGTERM): later stages wait for --resume
        if cfg.eval.enabled:
            _evaluate(stage, cfg.eval, index)


def _evaluate(stage, eval_cfg: EvalConfig, index: int) -> None:
    """`eval_cfg` on the stage's export, sharded as the stage trained, written next to it."""
    mesh = init_mesh(stage.parallel.sp_size, stage.parallel.ulysses_size)
    cfg = dataclasses.replace(eval_cfg, out=str(Path(stage.checkpoint.export_hf).parent / "eval"),
                              label=eval_cfg.label or f"stage {index} ({stage.train.seq_len} tokens)",
                              attention=stage.parallel.attention, layout=stage.parallel.layout)
    run_evals(stage.checkpoint.export_hf, cfg, mesh=mesh)
