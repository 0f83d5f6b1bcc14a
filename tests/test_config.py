"""Run config: strict YAML loading, --set overrides, validation errors that name the fix,
and every shipped config/launcher. Single process, no network, no DeepSpeed engine."""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from seqpar import SeqparError
from seqpar.data.config import DataConfig
from seqpar.eval_config import EvalConfig, PasskeyEvalConfig, PerplexityEvalConfig
from seqpar.train.config import RunConfig
from seqpar.train.config_io import (apply_override, config_from_dict, config_hash, dump_config,
                                    get_value, load_config)
from seqpar.train.validate import ATTENTIONS, validate_before_init, validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "models" / "tiny_llama.json"

# A small valid run: 4 ranks = DP 2 x SP 2. Files it names are written by `workdir`.
BASE = {
    "model": {"config_file": "model.json", "tokenizer": "byte", "dtype": "float32"},
    "data": {"sources": ["stdlib"]},
    "parallel": {"sp_size": 2, "attention": "ring", "layout": "zigzag"},
    "train": {"seq_len": 64, "steps": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 2,
              "deepspeed_config": "ds.json"},
}
WORLD = 4


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = a temp dir holding model.json, ds.json and run.yaml (= BASE)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.json").write_text(TINY.read_text())
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    write_yaml(tmp_path / "run.yaml", BASE)
    return tmp_path


def write_yaml(path, data):
    Path(path).write_text(yaml.safe_dump(data))
    return path


def load_and_validate(overrides=(), world=WORLD, model_config=None, path="run.yaml"):
    cfg = load_config(path, overrides)
    validate_config(cfg, world, model_config=model_config)
    return cfg


# --- loading ----------------------------------------------------------------------------

def test_empty_yaml_gives_defaults(tmp_path):
    write_yaml(tmp_path / "e.yaml", None)
    assert load_config(tmp_path / "e.yaml") == RunConfig()


def test_base_loads_and_validates(workdir):
    cfg = load_and_validate()
    assert cfg.parallel.sp_size == 2 and cfg.train.betas == (0.9, 0.95)
    assert cfg.model.config_file == "model.json"  # paths are kept as written (cwd-relative)


def test_overrides_coerce_types(workdir):
    cfg = load_config("run.yaml", [
        "train.lr=1e-5", "parallel.sp_size=4", "data.sources=[a, b]", "log.tensorboard=false",
        "model.name_or_path=1234", "checkpoint.export_hf=null", "train.betas=[0.8, 0.9]",
        "rope.extra.beta_fast=32", "train.grad_clip=2", "data.max_documents=10", "train.steps=1e3",
        "parallel.sp_size=8"])  # later overrides win
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.sp_size == 8
    assert cfg.data.sources == ["a", "b"]
    assert cfg.log.tensorboard is False
    assert cfg.model.name_or_path == "1234"  # str fields take the text as written
    assert cfg.checkpoint.export_hf is None
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.rope.extra == {"beta_fast": 32}
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.data.max_documents == 10 and cfg.train.steps == 1000


def test_yaml_scientific_floats(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  lr: 1e-5\n  min_lr: 3E-7\n  steps: 1e3\n")
    cfg = load_config(tmp_path / "r.yaml")
    assert cfg.train.lr == 1e-5 and cfg.train.min_lr == 3e-7 and cfg.train.steps == 1000


@pytest.mark.parametrize("text,match", [
    ("trian: {steps: 3}", r"unknown config key 'trian'.*Did you mean 'train'"),
    ("train: {lrr: 0.1}", r"unknown config key 'train.lrr'.*Did you mean 'train.lr'.*Valid keys in "
                          r"section 'train': seq_len, .*deepspeed_config"),
    ("seq_len: 1024", r"unknown config key 'seq_len'.*Did you mean 'train.seq_len'"),
    ("train: {sp_size: 2}", r"unknown config key 'train.sp_size'.*Valid keys in section 'train'"),
    ("parallel: {ulyses_size: 2}", r"Did you mean 'parallel.ulysses_size'"),
    ("1: 2", r"unknown config key '1'.*Valid keys at the top level: model, data"),
])
def test_unknown_keys_suggest_the_closest(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(SeqparError, match=match):
        load_config(tmp_path / "r.yaml")


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"unknown config key 'train.lrr' in --set train.lrr=1.*Did you mean 'train.lr'"),
    ("sp_size=2", r"Did you mean 'parallel.sp_size'"),
    ("train.lr", r"expected KEY=VALUE"),
    ("=3", r"expected KEY=VALUE"),
    ("train=3", r"train is a section; set one of its keys"),
    ("train.lr.x=3", r"train.lr is float, not a section"),
    ("train.lr=abc", r"train.lr: expected float, got 'abc'"),
    ("parallel.sp_size=4.5", r"parallel.sp_size: expected int, got '4.5'"),
    ("parallel.sp_size=four", r"parallel.sp_size: expected int, got 'four'"),
    ("log.tensorboard=maybe", r"log.tensorboard: expected bool"),
    ("data.sources=stdlib", r"data.sources: expected a list.*Write a list, e.g. \[a, b\]"),
    ("train.steps=null", r"train.steps: expected int, got 'null'"),
    ("rope.extra=[1]", r"rope.extra: expected a mapping"),
    ("train.seq_len=[1", r"not valid YAML"),
])
def test_bad_overrides(workdir, override, match):
    with pytest.raises(SeqparError, match=match):
        load_config("run.yaml", [override])


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "steps", "ten", "int"), ("train", "steps", 2.5, "int"), ("train", "steps", True, "int"),
    ("train", "lr", "fast", "float"), ("train", "lr", [1], "float"), ("train", "lr", False, "float"),
    ("parallel", "sp_size", "4", "int"), ("parallel", "attention", 3, "str"),
    ("parallel", "fused_rope", "yes please", "bool"), ("parallel", "fused_rope", 1, "bool"),
    ("data", "sources", "stdlib", "a list"), ("data", "sources", {"a": 1}, "a list"),
    ("data", "max_documents", "many", "int or null"), ("model", "name_or_path", 7, "str or null"),
    ("rope", "extra", [1, 2], "a mapping"), ("train", "betas", 0.9, "a list"),
    ("train", "steps", None, "int"),
])
def test_wrong_types_name_field_type_and_value(tmp_path, section, key, value, expected):
    write_yaml(tmp_path / "r.yaml", {section: {key: value}})
    with pytest.raises(SeqparError) as err:
        load_config(tmp_path / "r.yaml")
    msg = str(err.value)
    assert f"{section}.{key}: expected {expected}," in msg and repr(value) in msg, msg


@pytest.mark.parametrize("text,match", [
    ("train: [1, 2]", r"section 'train' in .* must be a mapping"),
    ("- a\n- b", r"the config in .* must be a mapping"),
    ("train: {lr: [}", r"not valid YAML"),
    ("a: b: c", r"not valid YAML"),
])
def test_malformed_files(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(SeqparError, match=match):
        load_config(tmp_path / "r.yaml")


def test_missing_config_file_names_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeqparError, match=r"config file 'nope.yaml' not found.*working directory"):
        load_config("nope.yaml")


def test_dump_roundtrip_and_hash(workdir):
    cfg = load_config("run.yaml", ["rope.method=yarn", "rope.extra.beta_fast=32"])
    dumped = dump_config(cfg)
    assert json.loads(json.dumps(dumped)) == dumped  # JSON-serialisable (betas as a list)
    assert yaml.safe_load(yaml.safe_dump(dumped)) == dumped
    assert config_from_dict(dumped) == cfg
    assert config_hash(cfg) == config_hash(config_from_dict(dumped))
    assert re.fullmatch(r"[0-9a-f]{64}", config_hash(cfg))
    other = copy.deepcopy(cfg)
    apply_override(other, "train.lr=3e-4")
    assert config_hash(other) != config_hash(cfg)
    assert get_value(cfg, "rope.extra.beta_fast") == 32 and get_value(cfg, "train.seq_len") == 64


# --- the eval section (typed: seqpar/eval_config.py) --------------------------------------

def test_eval_section_loads_typed_with_defaults(tmp_path):
    (tmp_path / "r.yaml").write_text(
        'eval:\n  ppl: {lengths: "1k,4k", data: {max_documents: 50}}\n  passkey: {lengths: 2k, depths: [0, 1]}\n')
    cfg = load_config(tmp_path / "r.yaml")
    ppl, passkey = cfg.eval.ppl, cfg.eval.passkey
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.enabled
    assert ppl == PerplexityEvalConfig(lengths="1k,4k", data=DataConfig(sources=["stdlib"], max_documents=50))
    assert (ppl.num_sequences, ppl.buckets, ppl.stride, ppl.windows) == (8, 8, None, 1)
    assert passkey == PasskeyEvalConfig(lengths="2k", depths=[0.0, 1.0], trials=5, seed=0)
    assert (cfg.eval.dtype, cfg.eval.attention, cfg.eval.layout) == ("auto", "ring", "zigzag")
    assert config_from_dict(dump_config(cfg)) == cfg
    assert not RunConfig().eval.enabled and load_config(write_yaml(tmp_path / "n.yaml", {"eval": None})) == RunConfig()


@pytest.mark.parametrize("text,match", [
    ("eval: {ppl: {lenghts: 1k}}", r"unknown config key 'eval.ppl.lenghts'.*Did you mean 'eval.ppl.lengths'.*"
                                   r"Valid keys in section 'eval.ppl': lengths, data"),
    ("eval: {pasky: {lengths: 1k}}", r"unknown config key 'eval.pasky'.*Did you mean 'eval.passkey'"),
    ("eval: {ppl: {lengths: 1k, data: {sorces: [a]}}}", r"Did you mean 'eval.ppl.data.sources'"),
    ("eval: {ppl: {num_sequences: 2}}", r"section 'eval.ppl' in .* needs eval.ppl.lengths"),
    ("eval: {passkey: {lengths: 1k, depths: [a]}}", r"eval.passkey.depths: expected a list of float"),
    ("eval: {ppl: 3}", r"section 'eval.ppl' in .* must be a mapping"),
])
def test_eval_section_errors(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(SeqparError, match=match):
        load_config(tmp_path / "r.yaml")


def test_eval_overrides(workdir):
    cfg = load_config("run.yaml", ["eval.ppl.lengths=1024", "eval.ppl.data.max_documents=3"])
    assert cfg.eval.ppl == PerplexityEvalConfig(lengths="1024", data=DataConfig(sources=["stdlib"], max_documents=3))
    cfg = load_config("run.yaml", ['eval={ppl: {lengths: "128,256", num_sequences: 2}}', "eval.ppl.buckets=4"])
    assert (cfg.eval.ppl.lengths, cfg.eval.ppl.num_sequences, cfg.eval.ppl.buckets) == ("128,256", 2, 4)
    assert load_config("run.yaml", ["eval.ppl.lengths=1k", "eval.ppl=null"]).eval.ppl is None
    for override, match in [("eval.ppl.trials=2", r"unknown config key 'eval.ppl.trials'"),
                            ("eval.passkey.trials=2", r"eval.passkey is not in the config and needs "
                                                      r"eval.passkey.lengths.*--set eval.passkey.lengths="),
                            ("eval.ppl=3", r"eval.ppl is a section.*or --set eval.ppl=null")]:
        with pytest.raises(SeqparError, match=match):
            load_config("run.yaml", [override])


@pytest.mark.parametrize("overrides, match", [
    (["eval.ppl.lengths=1k"], r"checkpoint.export_hf is not set; set checkpoint.export_hf"),
    (["checkpoint.export_hf=hf", "eval.ppl.lengths=1q"], r"eval.ppl.lengths '1q'"),
    (["checkpoint.export_hf=hf", "eval.ppl.lengths=1k", "eval.ppl.num_sequences=0"],
     r"eval.ppl.num_sequences must be an integer >= 1"),
    (["checkpoint.export_hf=hf", "eval.passkey.lengths=1k", "eval.passkey.depths=[0, 1.5]"],
     r"eval.passkey.depths must be a list of fractions in \[0, 1\]"),
    (["checkpoint.export_hf=hf", "eval.passkey.lengths=1k", "eval.layout=zagzig"], r"eval.layout must be one of"),
])
def test_eval_section_checked_before_training(workdir, overrides, match):
    """A bad eval setting fails with the config checks, before distributed init, not after
    the stage it evaluates has trained."""
    with pytest.raises(SeqparError, match=match):
        validate_before_init(load_config("run.yaml", overrides))


# --- validation: one clear error per bad setting -----------------------------------------

BAD = [  # (overrides, world size, message regex)
    (["train.steps=0"], WORLD, r"train.steps must be an integer >= 1, got 0"),
    (["train.seq_len=-8"], WORLD, r"train.seq_len must be an integer >= 1"),
    (["train.micro_batch_size=0"], WORLD, r"train.micro_batch_size must be an integer >= 1"),
    (["train.gradient_accumulation_steps=-1"], WORLD, r"train.gradient_accumulation_steps must be"),
    (["parallel.sp_size=0"], WORLD, r"parallel.sp_size must be an integer >= 1"),
    (["parallel.ulysses_size=-2"], WORLD, r"parallel.ulysses_size must be an integer >= 1"),
    (["checkpoint.keep_last=0"], WORLD, r"checkpoint.keep_last must be an integer >= 1"),
    (["checkpoint.every=-1"], WORLD, r"checkpoint.every must be an integer >= 0"),
    (["log.every=0"], WORLD, r"log.every must be"),
    (["train.warmup_steps=5"], WORLD, r"train.warmup_steps \(5\) exceeds train.steps \(3\)"),
    (["train.lr=0"], WORLD, r"train.lr must be a finite number > 0"),
    (["train.lr=.nan"], WORLD, r"train.lr must be a finite number > 0"),
    (["train.min_lr=1"], WORLD, r"train.min_lr must be a number in \[0, train.lr"),
    (["train.grad_clip=-1"], WORLD, r"train.grad_clip must be a number >= 0"),
    (["train.weight_decay=-0.1"], WORLD, r"train.weight_decay must be"),
    (["train.betas=[0.9]"], WORLD, r"train.betas must be two numbers in \[0, 1\)"),
    (["train.betas=[1.5, 0.9]"], WORLD, r"train.betas must be two numbers"),
    (["data.upsample_long=-1"], WORLD, r"data.upsample_long must be a number >= 0"),
    (["data.max_documents=0"], WORLD, r"data.max_documents must be null or an integer >= 1"),
    (["data.text_field= "], WORLD, r"data.text_field must be a non-empty string"),
    (["train.seed=-1"], WORLD, r"train.seed must be an integer >= 0"),
    # names
    (["parallel.attention=rign"], WORLD, r"parallel.attention='rign' is not valid \(did you mean 'ring'\?\); choose one of ring, ulysses, hybrid"),
    (["parallel.layout=zigzg"], WORLD, r"parallel.layout='zigzg'.*did you mean 'zigzag'.*contiguous"),
    (["parallel.attention_kernel=flash3"], WORLD, r"parallel.attention_kernel=.flash3.*did you mean .flash.*flash-attn"),
    (["model.dtype=fp16"], WORLD, r"model.dtype='fp16' is not valid.*auto, float32, bfloat16"),
    (["train.optimizer=adam"], WORLD, r"train.optimizer='adam'.*did you mean 'adamw'"),
    (["rope.method=yarm"], WORLD, r"rope.method='yarm'.*did you mean 'yarn'.*abf"),
    # parallel layout
    ([], 3, r"world size 3: world size 3 is not divisible by sp_size 2; launch a multiple of 2"),
    ([], 0, r"world size must be a positive int"),
    (["parallel.sp_size=4", "parallel.attention=hybrid", "parallel.ulysses_size=3"], WORLD,
     r"sp_size 4 is not divisible by ulysses_size 3"),
    (["parallel.attention=hybrid"], WORLD, r"'hybrid' needs parallel.ulysses_size > 1.*divisor of sp_size > 1 \(2\)"),
    (["parallel.head_groups=2"], WORLD, r"parallel.head_groups=2 needs parallel.tiled_layer.*set parallel.tiled_layer"),
    (["parallel.tiled_layer=64", "parallel.head_groups=0"], WORLD, r"parallel.head_groups must be an integer >= 1"),
    (["parallel.sp_size=1", "parallel.attention=hybrid"], WORLD, r"raise parallel.sp_size above 1"),
    (["parallel.ulysses_size=2"], WORLD, r"parallel.ulysses_size=2 only applies to attention 'hybrid'"),
    (["parallel.sp_size=4", "parallel.attention=ulysses", "parallel.ulysses_size=2"], WORLD,
     r"'ulysses' spreads heads over the whole SP group.*Ulysses 2 x ring 2"),
    (["parallel.sp_size=4", "parallel.attention=hybrid", "parallel.ulysses_size=2",
      "parallel.layout=stripe"], WORLD, r"'stripe' does not compose with attention 'hybrid'"),
    (["train.seq_len=102"], WORLD, r"train.seq_len=102 with parallel.layout='zigzag' and "
                                   r"parallel.sp_size=2:.*nearest: 100 or 104"),
    (["train.seq_len=3"], WORLD, r"nearest: 4\)"),
    (["train.seq_len=98", "parallel.layout=contiguous", "parallel.sp_size=4"], WORLD,
     r"train.seq_len=98.*nearest: 96 or 100"),
    (["train.seq_len=63", "parallel.layout=stripe"], WORLD, r"nearest: 62 or 64"),
    # RoPE settings
    (["rope.factor=4"], WORLD, r"rope.factor is set but rope.method is none"),
    (["rope.extra.beta_fast=32"], WORLD, r"rope.extra is set but rope.method is none"),
    (["rope.method=abf"], WORLD, r"'abf' .* needs rope.rope_theta"),
    (["rope.method=abf", "rope.rope_theta=1e6", "rope.factor=2"], WORLD, r"rope.factor does not apply to rope.method 'abf'"),
    (["rope.method=yarn", "rope.rope_theta=1e6"], WORLD, r"rope.rope_theta applies only to rope.method 'abf'"),
    (["rope.method=yarn", "rope.factor=0.5"], WORLD, r"rope.factor must be null or a number >= 1"),
    # model source
    (["model.name_or_path=meta-llama/Meta-Llama-3-8B"], WORLD, r"exactly one of model.name_or_path.*both are set"),
    (["model.config_file=null"], WORLD, r"exactly one of model.name_or_path.*neither is set"),
    (["model.config_file=missing.json"], WORLD, r"model.config_file: file 'missing.json' not found.*working directory"),
    (["model.config_file=bad.json"], WORLD, r"model.config_file: 'bad.json' is not valid JSON"),
    (["model.tokenizer=null"], WORLD, r"randomly initialised model, which has no tokenizer; set model.tokenizer"),
    (["model.config_file=null", "model.name_or_path=./models/nope"], WORLD, r"looks like a local path but .*config.json' does not exist"),
    (["model.config_file=null", "model.name_or_path=/no/such/dir"], WORLD, r"looks like a local path"),
    (["model.tokenizer=./tok"], WORLD, r"model.tokenizer './tok' looks like a local path"),
    # data sources
    (["data.sources=[]"], WORLD, r"data.sources is empty; list files or directories.*\[stdlib\]"),
    (["data.sources=[stdlib, corpus/missing.jsonl]"], WORLD, r"data.sources\[1\]: 'corpus/missing.jsonl' not found"),
    (["data.sources=['shards/*.parquet']"], WORLD, r"data.sources\[0\]: pattern 'shards/\*.parquet' matches no files"),
    (["data.sources=[3]"], WORLD, r"data.sources\[0\] must be a non-empty string"),
    # DeepSpeed JSON
    (["train.deepspeed_config=nope.json"], WORLD, r"train.deepspeed_config: file 'nope.json' not found"),
    (["train.deepspeed_config=bad.json"], WORLD, r"train.deepspeed_config: 'bad.json' is not valid JSON"),
    (["train.deepspeed_config=list.json"], WORLD, r"must hold a JSON object, got list"),
]
DS_BAD = [  # (DeepSpeed JSON, message regex); run config = BASE (micro 1, accum 2, DP 2)
    ({"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu=2 conflicts with train.micro_batch_size = 1; remove"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 conflicts with train.gradient_accumulation_steps = 2"),
    ({"train_batch_size": 2}, r"train_batch_size=2 conflicts with train.micro_batch_size x train.gradient_accumulation_steps x DP size 2 = 4"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping=0.5 conflicts with train.grad_clip = 1.0"),
    ({"bf16": {"enabled": "auto"}}, r"bf16.enabled is \"auto\", which DeepSpeed itself does not accept"),
    ({"train_batch_size": "auto"}, r"train_batch_size is \"auto\""),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, r"has an optimizer section but train.optimizer is 'adamw'"),
    ({"scheduler": {"type": "WarmupLR"}}, r"has a scheduler section; remove it"),
    ({"fp16": {"enabled": True}}, r"enables fp16, which seqpar does not support"),
    ({"bf16": {"enabled": True}}, r"enables bf16 but model.dtype is float32"),
    ({"zero_optimization": {"stage": 5}}, r"zero_optimization.stage=5; use 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, r"offload_param needs stage 3 \(got stage 2\)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, r"offload_optimizer needs stage 1, 2 or 3"),
    ({"zero_optimization": [3]}, r"zero_optimization must be a JSON object"),
]


@pytest.fixture
def bad_files(workdir):
    (workdir / "bad.json").write_text("{not json")
    (workdir / "list.json").write_text("[1, 2]")
    return workdir


@pytest.mark.parametrize("overrides,world,match", BAD, ids=[" ".join(o) or f"world={w}" for o, w, _ in BAD])
def test_bad_config_names_the_fix(bad_files, overrides, world, match):
    with pytest.raises(SeqparError, match=match):
        load_and_validate(overrides, world)


@pytest.mark.parametrize("ds,match", DS_BAD, ids=[json.dumps(d) for d, _ in DS_BAD])
def test_bad_deepspeed_json(workdir, ds, match):
    (workdir / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(SeqparError, match=match):
        load_and_validate()


def test_deepspeed_values_that_agree_are_fine(workdir):
    (workdir / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
        "train_batch_size": 4, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    load_and_validate()
    (workdir / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {}}}))
    load_and_validate(["train.optimizer=deepspeed"])
    (workdir / "ds.json").write_text("{}")
    with pytest.raises(SeqparError, match=r"'deepspeed' but .* has no optimizer section"):
        load_and_validate(["train.optimizer=deepspeed"])
    (workdir / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}}))
    load_and_validate(["model.dtype=bfloat16"])


def test_valid_variants(workdir):
    (workdir / "corpus").mkdir()
    (workdir / "corpus" / "a.jsonl").write_text('{"text": "hi"}\n')
    load_and_validate(["data.sources=[corpus, corpus/a.jsonl, 'corpus/*.jsonl', stdlib]"])
    load_and_validate(["parallel.sp_size=4", "parallel.attention=hybrid", "parallel.ulysses_size=2"])
    load_and_validate(["parallel.sp_size=4", "parallel.attention=ulysses"])
    load_and_validate(["parallel.sp_size=4", "parallel.attention=ulysses", "parallel.ulysses_size=4"])
    load_and_validate(["parallel.sp_size=4", "parallel.attention=hybrid", "parallel.ulysses_size=4",
                       "parallel.layout=stripe"])  # ring size 1: no ring to compose with
    load_and_validate(["train.seq_len=66", "parallel.layout=contiguous"])
    load_and_validate(["rope.method=abf", "rope.rope_theta=5e5"])
    load_and_validate(["rope.method=none"])
    load_and_validate(["parallel.sp_size=1"], world=3)
    (workdir / "hub").mkdir()
    (workdir / "hub" / "config.json").write_text(TINY.read_text())
    load_and_validate(["model.config_file=null", "model.name_or_path=./hub", "model.tokenizer=null"])
    # A Hub name is never resolved (no network): only its shape says it is not a local path.
    load_and_validate(["model.config_file=null", "model.name_or_path=org/not-downloaded"])


# --- validation against the model's config -------------------------------------------------

def llama3_8b():  # shape of meta-llama/Meta-Llama-3-8B, built locally (no download)
    return LlamaConfig(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                       max_position_embeddings=8192, vocab_size=128256)


def qwen25_7b():  # shape of Qwen/Qwen2.5-7B
    return Qwen2Config(num_attention_heads=28, num_key_value_heads=4, hidden_size=3584,
                       max_position_embeddings=131072, vocab_size=152064)


MODEL_BAD = [  # (model config, overrides, world, message regex)
    (qwen25_7b, ["parallel.sp_size=8", "parallel.attention=hybrid", "parallel.ulysses_size=8",
                 "train.seq_len=1024"], 8,
     r"parallel.ulysses_size=8 with attention 'hybrid' and this model \(28 query / 4 key-value "
     r"heads\): 28 query heads are not divisible by the Ulysses size 8"),
    (qwen25_7b, ["parallel.sp_size=8", "parallel.attention=ulysses", "train.seq_len=1024"], 8,
     r"parallel.sp_size=8 with attention 'ulysses'.*not divisible by the Ulysses size 8"),
    (lambda: LlamaConfig(num_attention_heads=12, num_key_value_heads=3, hidden_size=768), ["parallel.attention=hybrid",
     "parallel.ulysses_size=2"], WORLD, r"3 key/value heads cannot be split over Ulysses size 2"),
    (llama3_8b, ["train.seq_len=16384"], WORLD,
     r"train.seq_len=16384 exceeds the model's max_position_embeddings=8192.*set rope.method \(e.g. yarn; factor 2\)"),
    (llama3_8b, ["train.seq_len=32768", "rope.method=yarn", "rope.factor=2"], WORLD,
     r"rope.factor=2 x original length 8192 = 16384 is shorter than train.seq_len=32768; set rope.factor to 4"),
    (llama3_8b, ["train.seq_len=32768", "rope.method=linear", "rope.factor=2",
                 "rope.original_max_position_embeddings=4096"], WORLD, r"set rope.factor to 8"),
    (lambda: LlamaConfig(vocab_size=100), [], WORLD, r"'byte' needs vocab_size >= 256"),
    (llama3_8b, ["parallel.tiled_layer=1024", "parallel.head_groups=3"], WORLD,
     r"parallel.head_groups=3 with this model: 3 head groups do not split .* choose one of \[1, 2, 4, 8, 16, 32\]"),
]


@pytest.mark.parametrize("make,overrides,world,match", MODEL_BAD)
def test_model_config_checks(workdir, make, overrides, world, match):
    with pytest.raises(SeqparError, match=match):
        load_and_validate(overrides, world, model_config=make())


def test_model_config_accepts_valid_heads_and_extensions(workdir):
    q = qwen25_7b()
    for u in (2, 4):  # 28 % u == 0 and 4 % u == 0
        load_and_validate(["parallel.sp_size=4", "parallel.attention=hybrid",
                           f"parallel.ulysses_size={u}", "train.seq_len=1024"], 8, model_config=q)
    load_and_validate(["parallel.sp_size=8", "parallel.attention=ulysses", "train.seq_len=1024"], 8,
                      model_config=llama3_8b())  # 32 / 8 heads, 8 / 8 kv heads
    load_and_validate(["parallel.sp_size=4", "parallel.attention=ulysses", "train.seq_len=256"], 4,
                      model_config=AutoConfig.from_pretrained(TINY))  # kv 2 < 4: replicated
    load_and_validate(["train.seq_len=32768", "rope.method=yarn"], model_config=llama3_8b())
    load_and_validate(["train.seq_len=32768", "rope.method=llama3", "rope.factor=2"],
                      model_config=llama3_8b())  # llama3's factor is not a length ratio


def test_attention_names_match_the_model_layer():
    from seqpar.parallel import ALGORITHMS
    assert ATTENTIONS == ALGORITHMS


# --- fuzz: never anything but SeqparError --------------------------------------------------

JUNK = [None, -1, 0, 1, 2.5, -3.0, True, "", "x", "ring", [], [1, "a"], {}, {"a": 1}, 1e30, float("nan")]


def _mutations(rng, n):
    sections = {k: v for k, v in dump_config(RunConfig()).items()}
    for _ in range(n):
        data = copy.deepcopy(BASE)
        for _ in range(rng.randint(1, 3)):
            section = rng.choice(list(sections) + ["junk"])
            key = rng.choice(list(sections.get(section, {"x": 0})) + ["typo_key"])
            data.setdefault(section, {})
            if not isinstance(data[section], dict) or rng.random() < 0.05:
                data[section] = copy.deepcopy(rng.choice(JUNK))
                continue
            data[section][key] = copy.deepcopy(rng.choice(JUNK))
        yield data


def test_fuzz_bad_values_only_raise_seqpar_error(workdir):
    rng = random.Random(0)
    outcomes = {"ok": 0, "err": 0}
    for data in _mutations(rng, 400):
        write_yaml("fuzz.yaml", data)
        try:
            load_and_validate(path="fuzz.yaml", model_config=LlamaConfig(
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, vocab_size=260))
            outcomes["ok"] += 1
        except SeqparError as err:
            assert str(err) and "Traceback" not in str(err)
            outcomes["err"] += 1
    assert outcomes["err"] > 300


def test_fuzz_programmatic_configs_with_wrong_types(workdir):
    """A RunConfig built in Python skips the loader's type checks; validation still only
    raises SeqparError."""
    rng = random.Random(1)
    for _ in range(300):
        cfg = load_config("run.yaml")
        section = rng.choice(["train", "parallel", "data", "rope", "model", "checkpoint", "log"])
        obj = getattr(cfg, section)
        key = rng.choice(list(vars(obj)))
        setattr(obj, key, copy.deepcopy(rng.choice(JUNK)))
        try:
            validate_config(cfg, WORLD)
        except SeqparError:
            pass


def test_fuzz_parallel_layouts(workdir):
    rng = random.Random(2)
    heads = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 20)
    valid = 0
    for _ in range(400):
        world, sp, u = rng.randint(1, 17), rng.randint(1, 9), rng.randint(1, 9)
        seq_len = rng.choice([rng.randint(1, 300), 256, 1024, 96])
        attention, layout = rng.choice(ATTENTIONS), rng.choice(["zigzag", "contiguous", "stripe"])
        overrides = [f"parallel.sp_size={sp}", f"parallel.ulysses_size={u}", f"train.seq_len={seq_len}",
                     f"parallel.attention={attention}", f"parallel.layout={layout}"]
        try:
            load_and_validate(overrides, world, model_config=heads)
        except SeqparError:
            continue
        valid += 1
        # What passed really is a valid layout.
        assert world % sp == 0 and sp % u == 0
        assert seq_len % (2 * sp if layout == "zigzag" else sp) == 0
        ulysses = {"ring": 1, "ulysses": sp, "hybrid": u}[attention]
        assert 8 % ulysses == 0 and (2 % ulysses == 0 or ulysses % 2 == 0)
        assert (attention == "ring") <= (u == 1) and (attention == "hybrid") <= (u > 1)
    assert valid > 10


# --- what ships: configs/, DeepSpeed JSONs, the tiny model, launchers -----------------------

SHIPPED = {  # run YAML -> (world size it is written for, its model's shape)
    "tiny_cpu_demo.yaml": (4, lambda: AutoConfig.from_pretrained(TINY)),
    "llama3_8b_128k.yaml": (8, llama3_8b),
    "qwen2.5_7b_64k.yaml": (8, qwen25_7b),
    "multinode_llama3_8b_256k.yaml": (16, llama3_8b),
}


def test_every_shipped_yaml_is_covered():
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load_and_validate(name, tmp_path, monkeypatch):
    # cwd mirrors the repo root (configs/ as shipped) plus the placeholder corpus the
    # GPU examples name, so every check runs, file checks included.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "long_corpus.jsonl").write_text('{"text": "a long document"}\n')
    monkeypatch.chdir(tmp_path)
    world, model = SHIPPED[name]
    cfg = load_config(f"configs/{name}")
    validate_config(cfg, world, model_config=model())
    assert cfg.model.name_or_path is None or not Path(cfg.model.name_or_path).exists()  # Hub names


def test_tiny_demo_specifics():
    cfg = load_config(REPO / "configs" / "tiny_cpu_demo.yaml")
    m = AutoConfig.from_pretrained(TINY)
    assert (m.model_type, m.hidden_size, m.num_hidden_layers, m.num_attention_heads,
            m.num_key_value_heads, m.vocab_size, m.max_position_embeddings) == ("llama", 128, 4, 4, 2, 260, 256)
    assert cfg.data.sources == ["stdlib"] and cfg.model.tokenizer == "byte"
    assert (cfg.train.seq_len, cfg.parallel.sp_size) == (1024, 4)
    assert cfg.train.deepspeed_config.endswith("zero2.json") and cfg.train.steps == 30


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_jsons(stage, monkeypatch):
    ds = json.loads((REPO / "configs" / "deepspeed" / f"{stage}.json").read_text())
    # Left for the trainer to fill from the run config:
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "optimizer", "scheduler", "bf16", "fp16", "gradient_clipping"):
        assert key not in ds, key
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage"] == int(stage[4])
    if stage == "zero3_offload":
        for part in ("offload_optimizer", "offload_param"):
            assert ds["zero_optimization"][part] == {"device": "cpu", "pin_memory": True}
    # DeepSpeed's own parser accepts it once the trainer has filled the batch sizes.
    from deepspeed.runtime.config import DeepSpeedConfig
    parsed = DeepSpeedConfig({**ds, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                              "gradient_clipping": 1.0})
    assert parsed.zero_optimization_stage == int(stage[4]) and parsed.train_batch_size == 2
    if stage.startswith("zero3"):
        assert parsed.zero_config.gather_16bit_weights_on_model_save
    # And seqpar's validation accepts it with each shipped layout.
    monkeypatch.chdir(REPO)
    load_and_validate([f"train.deepspeed_config=configs/deepspeed/{stage}.json"], 4,
                      path=REPO / "configs" / "tiny_cpu_demo.yaml")


LAUNCHERS = ["torchrun.sh", "deepspeed.sh", "mpirun.sh", "slurm.sbatch", "cpu_gloo.sh"]


def test_every_launcher_is_listed():
    # quickstart.sh is the demo driver; common.sh and supervise.sh are sourced by the
    # launchers: none is a launcher of `seqpar train CONFIG.yaml`.
    helpers = ("quickstart.sh", "common.sh", "supervise.sh")
    assert sorted(p.name for p in (REPO / "launch").iterdir() if p.name not in helpers) == sorted(LAUNCHERS)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_usage(name):
    """Each launcher is strict bash, prints usage on -h and refuses to run without a config."""
    path = REPO / "launch" / name
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "seqpar.cli train" in text and '"$@"' in text
    ok = subprocess.run(["bash", str(path), "-h"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "usage:" in ok.stdout and "CONFIG.yaml" in ok.stdout
    bad = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.parametrize("name", [n for n in LAUNCHERS if n.endswith(".sh")])
def test_launchers_share_one_preamble(name, tmp_path):
    """Argument handling is written once, in launch/common.sh: a missing config is the same
    clear error, naming the launcher, from every script."""
    path = REPO / "launch" / name
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in path.read_text()
    bad = subprocess.run(["bash", str(path), "nope.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and f"{name}: config nope.yaml not found" in bad.stderr, bad.stderr


# --- before distributed init (issue 16) -------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("parallel.attention=rnig", "parallel.attention"),
    ("train.seq_len=63", "train.seq_len=63"),
    ("parallel.ulysses_size=3", "ulysses_size"),
])
def test_bad_config_fails_before_distributed_init(workdir, monkeypatch, override, match):
    """A config typo is reported before any process group exists (it used to wait ~40 s for
    DeepSpeed's distributed init)."""
    import torch.distributed as dist

    import seqpar.stages as stages
    import seqpar.train.loop as loop
    from seqpar.stages import run_stages

    def no_init(*args, **kwargs):
        raise AssertionError("distributed init reached with an invalid config")

    monkeypatch.setattr(stages, "init_distributed", no_init)
    monkeypatch.setattr(loop, "init_distributed", no_init)
    cfg = load_config("run.yaml", [override])
    with pytest.raises(SeqparError, match=re.escape(match)):
        run_stages(cfg)
    with pytest.raises(SeqparError, match=re.escape(match)):
        loop.setup(cfg)
    assert not dist.is_initialized()


def test_good_config_reaches_distributed_init(workdir, monkeypatch):
    """The self-check of the test above: a valid config does get to init."""
    import seqpar.stages as stages
    from seqpar.stages import run_stages

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(stages, "init_distributed", stop)
    with pytest.raises(Reached):
        run_stages(load_config("run.yaml"))


def test_error_line_is_one_write_so_ranks_cannot_interleave(monkeypatch):
    """Two ranks sharing an unbuffered stderr pipe: print() would write text and newline
    separately, and a sibling's line could land between them (seen in CI)."""
    from seqpar.errors import print_error

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    print_error("checkpoint.dir x is in use")
    assert writes == ["seqpar: error: checkpoint.dir x is in use\n"]
