"""Check a RunConfig before anything starts: one SeqparError per problem, naming the fix.

    validate_config(cfg, world_size=8, model_config=AutoConfig.from_pretrained(...))

Checks run cheapest first and stop at the first problem, so the message is about the
cause rather than its consequences. Rules that other layers own are not restated here:
mesh sizes come from `seqpar.parallel.check_mesh_sizes`, sequence divisibility from
`seqpar.parallel.check_layout`, heads vs Ulysses size from
`seqpar.parallel.ulysses.kv_replication`; their messages are prefixed with the config keys.
Paths resolve against the working directory (see config_io). Hub model names (anything
that is not a local path) are not resolved: no network access here.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import os

from ..errors import SeqparError
from ..ops.registry import KERNEL_NAMES
from ..parallel import ALGORITHMS, LAYOUTS, check_layout, check_mesh_sizes
from ..parallel.head_groups import check_head_groups
from ..parallel.ulysses import kv_replication
from ..units import parse_token_list
from .ckpt_integrity import VERIFY_MODES
from .config import RunConfig

ATTENTIONS = ALGORITHMS  # named once in seqpar.parallel
DTYPES = ("auto", "float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd", "deepspeed")
ROPE_METHODS = ("none", "linear", "dynamic", "yarn", "llama3", "longrope", "abf")
SPECIAL_SOURCES = ("stdlib",)  # data sources that are not paths
# Methods whose `factor` is by definition target_len / original_len.
_FACTOR_IS_LENGTH_RATIO = ("linear", "yarn")


def validate_config(cfg: RunConfig, world_size: int, *, model_config=None) -> None:
    """Raise SeqparError for the first invalid setting or combination in `cfg` for a job of
    `world_size` ranks. `model_config`: the model's transformers config when known (heads
    vs Ulysses size, seq_len vs max_position_embeddings, byte tokenizer vs vocab)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SeqparError(f"world size must be a positive int, got {world_size!r}.")
    validate_before_init(cfg, world_size)
    _check_model_source(cfg)
    _check_data_sources(cfg)
    _check_deepspeed(cfg, _read_deepspeed_json(cfg.train.deepspeed_config), world_size)
    if model_config is not None:
        _check_model_config(cfg, model_config)



def validate_before_init(cfg: RunConfig, world_size: int | None = None) -> None:
    """The checks that read only the config itself (numbers, names, parallel sizes, layout,
    RoPE): run before distributed init (world_size None: the world size is not known yet, so
    its divisibility by sp_size is checked later), so a typo fails in a second, not after
    DeepSpeed has built its communication op. Files and the DeepSpeed JSON are checked after
    init, where a problem seen by one rank stops every rank."""
    _check_numbers(cfg)
    _check_choices(cfg)
    _check_parallel(cfg, world_size)
    _check_rope(cfg)
    check_eval_section(cfg)


# --- the eval section -------------------------------------------------------------------

def check_eval_section(cfg: RunConfig) -> None:
    """The `eval:` settings, checked before any training: a typo there must not surface
    only after the stage it evaluates has trained."""
    ev = cfg.eval
    if not ev.enabled:
        return
    if not cfg.stages and not cfg.checkpoint.export_hf:
        raise SeqparError("eval runs on the exported model, but checkpoint.export_hf is not set; set "
                          "checkpoint.export_hf to a directory, or remove the eval section.")
    for name, section in (("ppl", ev.ppl), ("passkey", ev.passkey)):
        if section is not None:
            try:
                parse_token_list(section.lengths)
            except SeqparError as err:
                raise SeqparError(f"eval.{name}.lengths {section.lengths!r}: {err}") from None
    if ev.ppl is not None:
        for key in ("num_sequences", "buckets", "windows"):
            _need(_int_at_least(getattr(ev.ppl, key), 1), f"eval.ppl.{key}", getattr(ev.ppl, key), "an integer >= 1")
        if ev.ppl.stride is not None:
            _need(_int_at_least(ev.ppl.stride, 1), "eval.ppl.stride", ev.ppl.stride, "an integer >= 1 or null")
    if ev.passkey is not None:
        _need(_int_at_least(ev.passkey.trials, 1), "eval.passkey.trials", ev.passkey.trials, "an integer >= 1")
        bad = [d for d in ev.passkey.depths if not 0 <= d <= 1]
        _need(not bad and bool(ev.passkey.depths), "eval.passkey.depths", ev.passkey.depths,
              "a list of fractions in [0, 1], e.g. [0, 0.5, 1]")
    _need(ev.attention in ALGORITHMS, "eval.attention", ev.attention, f"one of {', '.join(ALGORITHMS)}")
    _need(ev.layout in LAYOUTS, "eval.layout", ev.layout, f"one of {', '.join(LAYOUTS)}")


# --- numbers and names ------------------------------------------------------------------

def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _need(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise SeqparError(f"{key} must be {rule}, got {value!r}; set {key} to {rule}.")


def _check_numbers(cfg: RunConfig) -> None:
    t, p, d, r, c, lg, m = cfg.train, cfg.parallel, cfg.data, cfg.rope, cfg.checkpoint, cfg.log, cfg.model
    positive = {"train.seq_len": t.seq_len, "train.micro_batch_size": t.micro_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.steps": t.steps, "parallel.sp_size": p.sp_size,
                "parallel.ulysses_size": p.ulysses_size, "checkpoint.keep_last": c.keep_last,
                "log.every": lg.every}
    for key, value in positive.items():
        _need(_int_at_least(value, 1), key, value, "an integer >= 1")
    non_negative = {"train.warmup_steps": t.warmup_steps, "checkpoint.every": c.every,
                    "train.seed": t.seed, "data.seed": d.seed, "model.seed": m.seed}
    for key, value in non_negative.items():
        _need(_int_at_least(value, 0), key, value, "an integer >= 0")
    if t.warmup_steps > t.steps:
        raise SeqparError(f"train.warmup_steps ({t.warmup_steps}) exceeds train.steps ({t.steps}); "
                          f"the learning rate would never reach train.lr. Lower train.warmup_steps.")
    _need(_is_num(t.lr) and t.lr > 0, "train.lr", t.lr, "a finite number > 0")
    _need(_is_num(t.min_lr) and 0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr,
          f"a number in [0, train.lr = {t.lr}]")
    _need(_is_num(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay,
          "a number >= 0")
    _need(_is_num(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", t.grad_clip,
          "a number >= 0 (0 disables clipping)")
    _need(isinstance(t.betas, (list, tuple)) and len(t.betas) == 2
          and all(_is_num(b) and 0 <= b < 1 for b in t.betas), "train.betas", t.betas,
          "two numbers in [0, 1), e.g. [0.9, 0.95]")
    _need(_is_num(d.upsample_long) and d.upsample_long >= 0, "data.upsample_long",
          d.upsample_long, "a number >= 0")
    _need(d.max_documents is None or _int_at_least(d.max_documents, 1), "data.max_documents",
          d.max_documents, "null or an integer >= 1")
    _check_tiles(p)
    _need(r.factor is None or (_is_num(r.factor) and r.factor >= 1), "rope.factor", r.factor,
          "null or a number >= 1")
    _need(r.rope_theta is None or (_is_num(r.rope_theta) and r.rope_theta > 0), "rope.rope_theta",
          r.rope_theta, "null or a number > 0")
    _need(r.original_max_position_embeddings is None or _int_at_least(r.original_max_position_embeddings, 1),
          "rope.original_max_position_embeddings", r.original_max_position_embeddings,
          "null or an integer >= 1")
    for key, value in {"data.text_field": d.text_field, "data.cache_dir": d.cache_dir,
                       "train.deepspeed_config": t.deepspeed_config, "checkpoint.dir": c.dir,
                       "log.dir": lg.dir}.items():
        _need(isinstance(value, str) and bool(value.strip()), key, value, "a non-empty string")
    _need(isinstance(r.extra, dict), "rope.extra", r.extra, "a mapping")
    for key, value in {"model.name_or_path": m.name_or_path, "model.config_file": m.config_file,
                       "model.tokenizer": m.tokenizer, "checkpoint.export_hf": c.export_hf}.items():
        _need(value is None or (isinstance(value, str) and bool(value.strip())), key, value,
              "null or a non-empty string")
    for key, value in {"model.gradient_checkpointing": m.gradient_checkpointing,
                       "data.cross_document_attention": d.cross_document_attention,
                       "parallel.fused_rope": p.fused_rope, "parallel.tiled_loss": p.tiled_loss,
                       "log.tensorboard": lg.tensorboard, "checkpoint.overwrite": c.overwrite}.items():
        _need(isinstance(value, bool), key, value, "true or false")


def _check_tiles(p) -> None:
    """Tile and chunk sizes, and head groups (which only the tiled layer runs)."""
    for key in ("tiled_mlp", "tiled_layer", "loss_chunk"):
        value = getattr(p, key)
        _need(value is None or _int_at_least(value, 1), f"parallel.{key}", value,
              "null or an integer >= 1 (tokens per tile)")
    _need(_int_at_least(p.head_groups, 1), "parallel.head_groups", p.head_groups,
          "an integer >= 1 (1: attention over all heads at once)")
    if p.head_groups != 1 and not p.tiled_layer:
        raise SeqparError(f"parallel.head_groups={p.head_groups} needs parallel.tiled_layer (the tiled layer "
                          f"runs attention in head groups); set parallel.tiled_layer (e.g. 8192) or remove "
                          f"parallel.head_groups.")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SeqparError(f"{key}={value!r} is not valid{hint}; choose one of {', '.join(choices)}.")


def _check_choices(cfg: RunConfig) -> None:
    _choice("parallel.attention", cfg.parallel.attention, ATTENTIONS)
    _choice("parallel.layout", cfg.parallel.layout, LAYOUTS)
    _choice("parallel.attention_kernel", cfg.parallel.attention_kernel, KERNEL_NAMES)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    _choice("rope.method", _rope_method(cfg), ROPE_METHODS)
    _choice("checkpoint.verify", cfg.checkpoint.verify, VERIFY_MODES)


def _rope_method(cfg: RunConfig) -> str:
    return "none" if cfg.rope.method is None else cfg.rope.method


# --- parallel layout --------------------------------------------------------------------

def _layout_ok(seq_len: int, sp: int, layout: str) -> bool:
    try:
        check_layout(seq_len, sp, layout)
    except SeqparError:
        return False
    return True


def _nearest_seq_lens(seq_len: int, sp: int, layout: str) -> tuple[int | None, int]:
    """Closest valid seq_len below and above, found by asking check_layout (so the
    divisibility rule lives in one place). Any layout's period is at most 2 * sp."""
    below = next((s for s in range(seq_len - 1, max(seq_len - 2 * sp, 0) - 1, -1)
                  if s >= 1 and _layout_ok(s, sp, layout)), None)
    above = next(s for s in range(seq_len + 1, seq_len + 2 * sp + 1) if _layout_ok(s, sp, layout))
    return below, above


def _check_parallel(cfg: RunConfig, world_size: int | None) -> None:
    p, seq_len = cfg.parallel, cfg.train.seq_len
    try:
        # Without a world size yet: a world of one SP group checks the sizes themselves.
        check_mesh_sizes(p.sp_size if world_size is None else world_size, p.sp_size, p.ulysses_size)
    except SeqparError as err:
        world = "" if world_size is None else f", world size {world_size}"
        raise SeqparError(f"parallel.sp_size={p.sp_size}, parallel.ulysses_size={p.ulysses_size}"
                          f"{world}: {err}") from None
    u, sp = p.ulysses_size, p.sp_size
    if p.attention == "ring" and u != 1:
        raise SeqparError(f"parallel.ulysses_size={u} only applies to attention 'hybrid'; set "
                          f"parallel.attention: hybrid, or parallel.ulysses_size: 1 for pure ring.")
    if p.attention == "ulysses" and u not in (1, sp):
        raise SeqparError(f"attention 'ulysses' spreads heads over the whole SP group (sp_size={sp}); "
                          f"set parallel.ulysses_size to 1 (or {sp}), or use parallel.attention: hybrid "
                          f"for Ulysses {u} x ring {sp // u}.")
    if p.attention == "hybrid":
        if u == 1:
            divisors = [k for k in range(2, sp + 1) if sp % k == 0]
            fix = (f"set parallel.ulysses_size to a divisor of sp_size > 1 ({', '.join(map(str, divisors))})"
                   if divisors else "raise parallel.sp_size above 1")
            raise SeqparError(f"attention 'hybrid' needs parallel.ulysses_size > 1 (Ulysses inside, "
                              f"ring across); {fix}, or use parallel.attention: ring.")
        if p.layout == "stripe" and 1 < u < sp:  # mirrors hybrid_attention's own check
            raise SeqparError("parallel.layout 'stripe' does not compose with attention 'hybrid'; "
                              "set parallel.layout: zigzag (or contiguous).")
    try:
        check_layout(seq_len, sp, p.layout)
    except SeqparError as err:
        below, above = _nearest_seq_lens(seq_len, sp, p.layout)
        near = f"{below} or {above}" if below else f"{above}"
        raise SeqparError(f"train.seq_len={seq_len} with parallel.layout={p.layout!r} and "
                          f"parallel.sp_size={sp}: {err} Set train.seq_len to a valid length "
                          f"(nearest: {near}).") from None


# --- RoPE -------------------------------------------------------------------------------

def _check_rope(cfg: RunConfig) -> None:
    r, method = cfg.rope, _rope_method(cfg)
    if method == "none":
        for key, value in (("factor", r.factor), ("rope_theta", r.rope_theta),
                           ("original_max_position_embeddings", r.original_max_position_embeddings),
                           ("extra", r.extra or None)):
            if value is not None:
                raise SeqparError(f"rope.{key} is set but rope.method is none, so it would be "
                                  f"ignored; set rope.method (e.g. yarn) or remove rope.{key}.")
    elif method == "abf":
        if r.rope_theta is None:
            raise SeqparError("rope.method 'abf' (adjusted base frequency) needs rope.rope_theta, "
                              "the new base (e.g. 500000); set rope.rope_theta.")
        if r.factor is not None:
            raise SeqparError("rope.factor does not apply to rope.method 'abf' (it changes "
                              "rope_theta); remove rope.factor, or pick a scaling method such as yarn.")
    elif r.rope_theta is not None:
        raise SeqparError(f"rope.rope_theta applies only to rope.method 'abf', not {method!r}; "
                          f"remove rope.rope_theta or set rope.method: abf.")


# --- files ------------------------------------------------------------------------------

def _is_local_path(name: str) -> bool:
    """Does `name` mean a local directory rather than a Hub id (org/name)?"""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or name.endswith("/") or os.path.exists(name))


def _read_json(path: str, key: str) -> dict:
    if not os.path.isfile(path):
        raise SeqparError(f"{key}: file {path!r} not found (relative paths resolve against the "
                          f"working directory {os.getcwd()!r}); fix the path.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise SeqparError(f"{key}: cannot read {path!r}: {err}") from None
    except json.JSONDecodeError as err:
        raise SeqparError(f"{key}: {path!r} is not valid JSON ({err}); fix the file.") from None
    if not isinstance(data, dict):
        raise SeqparError(f"{key}: {path!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _check_model_source(cfg: RunConfig) -> None:
    m = cfg.model
    if (m.name_or_path is None) == (m.config_file is None):
        which = "both are set" if m.name_or_path else "neither is set"
        raise SeqparError(f"set exactly one of model.name_or_path (Hugging Face name or local "
                          f"directory: pretrained weights) and model.config_file (model config "
                          f"JSON: random initialisation); {which}.")
    if m.config_file is not None:
        _read_json(m.config_file, "model.config_file")
        if m.tokenizer is None:
            raise SeqparError("model.config_file builds a randomly initialised model, which has no "
                              "tokenizer; set model.tokenizer (byte, or a tokenizer name/path).")
    elif _is_local_path(m.name_or_path) and not os.path.isfile(os.path.join(m.name_or_path, "config.json")):
        raise SeqparError(f"model.name_or_path {m.name_or_path!r} looks like a local path but "
                          f"{os.path.join(m.name_or_path, 'config.json')!r} does not exist; fix the "
                          f"path, or give a Hugging Face name such as meta-llama/Meta-Llama-3-8B.")
    if m.tokenizer not in (None, "byte") and _is_local_path(m.tokenizer) and not os.path.isdir(m.tokenizer):
        raise SeqparError(f"model.tokenizer {m.tokenizer!r} looks like a local path but is not a "
                          f"directory; fix the path, or use byte or a Hugging Face name.")


def _check_data_sources(cfg: RunConfig) -> None:
    sources = cfg.data.sources
    if not isinstance(sources, (list, tuple)):
        raise SeqparError(f"data.sources must be a list, got {sources!r}; write e.g. [stdlib].")
    if not sources:
        raise SeqparError("data.sources is empty; list files or directories (txt, jsonl, parquet), "
                          "e.g. [data/corpus.jsonl], or [stdlib] for Python's own sources.")
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(src, str) or not src.strip():
            raise SeqparError(f"{key} must be a non-empty string (a path or stdlib), got {src!r}.")
        if src in SPECIAL_SOURCES or "://" in src:
            continue
        if glob.has_magic(src):
            if not glob.glob(src, recursive=True):
                raise SeqparError(f"{key}: pattern {src!r} matches no files (relative to "
                                  f"{os.getcwd()!r}); fix the pattern.")
        elif not os.path.exists(src):
            raise SeqparError(f"{key}: {src!r} not found (relative paths resolve against the "
                              f"working directory {os.getcwd()!r}); fix the path.")


# --- DeepSpeed JSON ---------------------------------------------------------------------

def _read_deepspeed_json(path: str) -> dict:
    return _read_json(path, "train.deepspeed_config")


def _find_auto(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(node, str) and node == "auto":
        return path
    return None


def _check_deepspeed(cfg: RunConfig, ds: dict, world_size: int) -> None:
    t, src = cfg.train, f"train.deepspeed_config ({cfg.train.deepspeed_config})"
    auto = _find_auto(ds)
    if auto:
        raise SeqparError(f"{src}: {auto} is \"auto\", which DeepSpeed itself does not accept (it is "
                          f"a Hugging Face Trainer convention); remove it: seqpar fills batch sizes, "
                          f"clipping and precision from the run config.")
    dp = world_size // cfg.parallel.sp_size
    expected = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (t.micro_batch_size * t.gradient_accumulation_steps * dp,
                             f"train.micro_batch_size x train.gradient_accumulation_steps x DP size {dp}"),
        "gradient_clipping": (t.grad_clip, "train.grad_clip"),
    }
    for key, (want, origin) in expected.items():
        if key in ds and ds[key] != want:
            raise SeqparError(f"{src}: {key}={ds[key]!r} conflicts with {origin} = {want}; remove "
                              f"{key} from the JSON (seqpar fills it from the run config).")
    if "optimizer" in ds and t.optimizer != "deepspeed":
        raise SeqparError(f"{src} has an optimizer section but train.optimizer is {t.optimizer!r}; "
                          f"remove the section, or set train.optimizer: deepspeed to use it.")
    if t.optimizer == "deepspeed" and not isinstance(ds.get("optimizer"), dict):
        raise SeqparError(f"train.optimizer is 'deepspeed' but {src} has no optimizer section; add "
                          f"one, or set train.optimizer: adamw.")
    if "scheduler" in ds:
        raise SeqparError(f"{src} has a scheduler section; remove it: seqpar's warmup + cosine "
                          f"schedule is set by train.lr, train.min_lr and train.warmup_steps.")
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled"):
        raise SeqparError(f"{src} enables fp16, which seqpar does not support; remove the fp16 "
                          f"section (bf16 is used on GPU, see model.dtype).")
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") and cfg.model.dtype == "float32":
        raise SeqparError(f"{src} enables bf16 but model.dtype is float32; remove the bf16 section "
                          f"(seqpar sets it from model.dtype) or set model.dtype: bfloat16.")
    _check_zero(ds.get("zero_optimization", {}), src)


def _check_zero(zero, src: str) -> None:
    if not isinstance(zero, dict):
        raise SeqparError(f"{src}: zero_optimization must be a JSON object.")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise SeqparError(f"{src}: zero_optimization.stage={stage!r}; use 0, 1, 2 or 3.")
    if _offloads(zero.get("offload_param")) and stage != 3:
        raise SeqparError(f"{src}: zero_optimization.offload_param needs stage 3 (got stage "
                          f"{stage}); set stage 3 or remove offload_param.")
    if _offloads(zero.get("offload_optimizer")) and stage == 0:
        raise SeqparError(f"{src}: zero_optimization.offload_optimizer needs stage 1, 2 or 3; set "
                          f"a stage or remove offload_optimizer.")


def _offloads(section) -> bool:
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


# --- model config -----------------------------------------------------------------------

def _check_model_config(cfg: RunConfig, config) -> None:
    config = getattr(config, "text_config", None) or config  # multimodal wrappers
    p, seq_len, method = cfg.parallel, cfg.train.seq_len, _rope_method(cfg)
    heads = getattr(config, "num_attention_heads", None)
    if heads:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        ulysses = {"ring": 1, "ulysses": p.sp_size, "hybrid": p.ulysses_size}[p.attention]
        key = "parallel.sp_size" if p.attention == "ulysses" else "parallel.ulysses_size"
        try:
            kv_replication(heads, kv_heads, ulysses)
        except SeqparError as err:
            raise SeqparError(f"{key}={ulysses} with attention {p.attention!r} and this model "
                              f"({heads} query / {kv_heads} key-value heads): {err}") from None
        if p.head_groups != 1:
            try:
                check_head_groups(heads, kv_heads, p.head_groups, ulysses)
            except SeqparError as err:
                raise SeqparError(f"parallel.head_groups={p.head_groups} with this model: {err}") from None
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and method == "none" and seq_len > max_pos:
        raise SeqparError(f"train.seq_len={seq_len} exceeds the model's max_position_embeddings="
                          f"{max_pos} and no RoPE extension is configured; set rope.method (e.g. "
                          f"yarn; factor {seq_len / max_pos:g}) or lower train.seq_len.")
    orig = cfg.rope.original_max_position_embeddings or max_pos
    if method in _FACTOR_IS_LENGTH_RATIO and cfg.rope.factor and orig and orig * cfg.rope.factor < seq_len:
        raise SeqparError(f"rope.factor={cfg.rope.factor:g} x original length {orig} = "
                          f"{orig * cfg.rope.factor:g} is shorter than train.seq_len={seq_len}; set "
                          f"rope.factor to {seq_len / orig:g} (or leave it out: seq_len / original).")
    vocab = getattr(config, "vocab_size", None)
    if cfg.model.tokenizer == "byte" and vocab is not None and vocab < 256:
        raise SeqparError(f"model.tokenizer 'byte' needs vocab_size >= 256 (bytes + specials), the "
                          f"model has {vocab}; use a larger vocab_size or another tokenizer.")
