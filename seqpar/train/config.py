"""The run configuration: one YAML file per run, validated before anything starts.

Sections mirror the YAML: model, data, parallel, rope, train, checkpoint, log, stages,
eval (its classes in seqpar/eval_config.py, a layer below both train and eval). Every
field has a default so a small YAML suffices; `load_config` applies `--set a.b=value`
overrides; `validate_config` raises one SeqparError naming the fix for each invalid
combination (see seqpar/train/validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.config import DataConfig  # noqa: F401  (the data section; re-exported here)
from ..eval_config import EvalConfig


@dataclass
class ModelConfig:
    # One of: a Hugging Face name or local directory (`name_or_path`), or a config file
    # (JSON, as written by save_pretrained) for random initialisation (`config_file`).
    name_or_path: str | None = None
    config_file: str | None = None
    tokenizer: str | None = None  # name/path; "byte" = the built-in byte-level tokenizer
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    gradient_checkpointing: bool = False
    seed: int = 0  # random init seed (config_file models)


@dataclass
class ParallelConfig:
    sp_size: int = 1
    ulysses_size: int = 1
    attention: str = "ring"  # ring | ulysses | hybrid
    layout: str = "zigzag"  # zigzag | contiguous | stripe
    fused_rope: bool = True
    tiled_loss: bool = True
    loss_chunk: int | None = None  # tokens per chunk of the tiled loss; None = 256 MiB of float32 logits
    tiled_mlp: int | None = None  # tokens per MLP tile (recomputed in backward); None = plain MLP
    offload_activations: bool = False  # tensors saved for backward live in pinned CPU memory
    tiled_layer: int | None = None  # tokens per tile for every token-wise part of a layer; None = off
    head_groups: int = 1  # tiled layer: attention in this many groups of heads, one at a time
    attention_kernel: str = "auto"  # auto | flash | cudnn | efficient | flash-attn | seqpar | torch


@dataclass
class RopeConfig:
    method: str | None = None  # None (keep the model's) | linear | dynamic | yarn | llama3 | longrope | abf
    original_max_position_embeddings: int | None = None
    factor: float | None = None  # default: seq_len / original length
    rope_theta: float | None = None  # abf: the new base frequency
    extra: dict = field(default_factory=dict)  # passed to seqpar.extend_context


@dataclass
class TrainConfig:
    seq_len: int = 4096
    micro_batch_size: int = 1  # sequences per DP rank per micro-step
    gradient_accumulation_steps: int = 1
    steps: int = 100
    optimizer: str = "adamw"  # adamw | sgd | deepspeed (use the DeepSpeed JSON's optimizer)
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    seed: int = 0
    dist_timeout_minutes: float = 30.0  # a dead/stuck rank fails collectives after this


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    export_hf: str | None = None  # directory for a save_pretrained export at the end
    # A fresh run (no --resume) in a directory holding checkpoints refuses to start unless
    # this is true; then the old ones are moved aside to <dir>/replaced-<run id>/.
    overwrite: bool = False
    verify: str = "full"  # at resume: full (re-hash every file, split over ranks) | size (sizes only)


@dataclass
class LogConfig:
    dir: str = "runs/logs"
    every: int = 1
    tensorboard: bool = True  # when installed


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Staged length schedule: each stage is a mapping of `--set`-style overrides, e.g.
    # {train.seq_len: 32768, train.steps: 500, train.lr: 1e-5}; stage k+1 starts from
    # stage k's Hugging Face export (seqpar/stages.py). Empty: one stage.
    stages: list = field(default_factory=list)
    # Evaluations at the end of each stage (seqpar/eval_config.py; seqpar.eval.cli.run_evals),
    # e.g. {ppl: {lengths: "1k,4k", data: {sources: [stdlib], max_documents: 50}}}. Neither
    # ppl nor passkey: none.
    eval: EvalConfig = field(default_factory=EvalConfig)
