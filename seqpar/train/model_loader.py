"""Build the model a run trains: pretrained weights or a random init from a config file,
with the RoPE extension applied to its config, under DeepSpeed's ZeRO-3 construction
when stage 3 is on (parameters are partitioned as they are created)."""

from __future__ import annotations

import contextlib
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import SeqparError
from ..model.extend import extend_context
from ..runtime import resolve_dtype


def model_config(cfg):
    """The transformers config of the run, with RoPE extended to train.seq_len if asked.
    transformers' own errors (bad values, unknown model type) become a SeqparError."""
    source = cfg.model.config_file or cfg.model.name_or_path  # dir, file or name
    try:
        config = AutoConfig.from_pretrained(source)
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:400]
        raise SeqparError(f"the model config {source} is not valid for transformers: {type(e).__name__}: "
                          f"{first}; fix model.config_file / model.name_or_path.") from None
    rope = cfg.rope
    if rope.method and rope.method != "none":
        config = extend_context(config, cfg.train.seq_len, rope.method,
                                original_max_position_embeddings=rope.original_max_position_embeddings,
                                factor=rope.factor, rope_theta=rope.rope_theta, **rope.extra)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    return config


def load_model(cfg, ds_config: dict, config=None):
    """Returns (model, hf_deepspeed_config); keep the second alive while training (ZeRO-3)."""
    import deepspeed  # deferred: deepspeed (heavy), only for ZeRO-3 construction
    from transformers.integrations import HfDeepSpeedConfig  # deferred: imports deepspeed

    config = config or model_config(cfg)
    dtype = resolve_dtype(cfg.model.dtype)
    stage3 = int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    # Construction only needs the ZeRO settings. Without train_batch_size DeepSpeed does not
    # check it against micro x accumulation x world size, which is wrong under SP here
    # (no mpu at construction: it would count SP ranks as data parallel).
    construct = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    # HfDeepSpeedConfig must be alive before from_pretrained/from_config for ZeRO-3.
    hf_ds = HfDeepSpeedConfig(construct) if stage3 else None
    if cfg.model.config_file:
        torch.manual_seed(cfg.model.seed)
        init = deepspeed.zero.Init(config_dict_or_path=construct) if stage3 else contextlib.nullcontext()
        with init:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, config=config, dtype=dtype)
    return model, hf_ds
