"""`seqpar eval ppl` and `seqpar eval passkey`, and `run_evals` for the trainer.

    seqpar eval ppl --model DIR --lengths 1k,2k,4k --data stdlib [--sp-size 4] [--compare OTHER/ppl.json]
    seqpar eval passkey --model DIR --lengths 1k,4k --depths 0,0.5,1 --trials 5 [--sp-size 4]

With --sp-size N > 1 and no launcher, N local ranks are spawned (gloo on the CPU, nccl
with N GPUs); under torchrun / deepspeed / mpirun every launched rank takes part
(world size = DP x SP: DP groups share the sequences). Rank 0 writes <out>/ppl.json +
ppl.png (or passkey.json + passkey.png) and prints a markdown table.

This module imports nothing heavy at import time: `seqpar --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

import torch.distributed as dist

from ..commands import add_group
from ..data import DataConfig, load_tokenizer
from ..errors import SeqparError
from ..eval_config import EvalConfig, PasskeyEvalConfig, PerplexityEvalConfig
from ..parallel import ALGORITHMS, init_mesh
from ..units import parse_token_list, parse_tokens
from .passkey import evaluate_passkey
from .passkey import markdown as passkey_markdown
from .perplexity import default_stride, evaluate_perplexity, window_ends
from .perplexity import markdown as ppl_markdown
from .plots import plot_passkey, plot_perplexity
from .runner import launch, load_model

# ----------------------------------------------------------------------------- arguments

# The defaults of the options below: those of the run config's `eval:` section (lengths
# are given on the command line).
_EVAL, _PPL, _PASSKEY = EvalConfig(), PerplexityEvalConfig(lengths=""), PasskeyEvalConfig(lengths="")


def _common_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument("--model", required=model_required, metavar="DIR",
                   help="Hugging Face model directory (e.g. the export of `seqpar train`)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory or 'byte' (default: --model)")
    p.add_argument("--lengths", required=model_required, metavar="L,L,...",
                   help="evaluation lengths in tokens, e.g. 1k,2k,4k (k = 1024, m = 1024^2)")
    p.add_argument("--label", help="name of this model in tables and plots (default: the model directory)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/eval/<label>)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=_EVAL.dtype,
                   help="auto: bfloat16 on GPU, float32 on CPU (default %(default)s)")
    g = p.add_argument_group("sequence parallelism")
    g.add_argument("--sp-size", type=int, default=1, help="ranks sharing one sequence (default 1)")
    g.add_argument("--ulysses-size", type=int, default=1, help="Ulysses part of the SP group (hybrid)")
    g.add_argument("--attention", choices=ALGORITHMS, default=_EVAL.attention)
    g.add_argument("--layout", choices=("zigzag", "contiguous", "stripe"), default=_EVAL.layout)
    g.add_argument("--fused-rope", action="store_true", help="seqpar's fused RoPE op instead of the model's")
    r = p.add_argument_group("RoPE scaling at evaluation time (same weights, other positions)")
    r.add_argument("--rope-method", choices=("linear", "dynamic", "yarn", "llama3", "abf"),
                   help="apply seqpar.extend_context to the config before evaluating")
    r.add_argument("--rope-factor", type=float, help="scaling factor (default: target / original length)")
    r.add_argument("--rope-theta", type=float, help="abf: the new base frequency")
    r.add_argument("--rope-original-length", type=int, help="the length the model was trained at")
    r.add_argument("--rope-target", help="target length (default: the longest --lengths)")


def add_parser(commands) -> None:
    """Add `eval ppl` and `eval passkey` to the `seqpar` subcommands."""
    evals = add_group(commands, "eval", help="long-context evaluation: perplexity by length, passkey retrieval",
                      metavar="EVAL")
    ppl = evals.add_parser(
        "ppl", help="perplexity at each length, and loss by position",
        description="Perplexity at each evaluation length on the SAME tokens (sliding windows of L tokens "
                    "scoring their last --stride tokens, so each scored token sees L-stride..L-1 tokens of "
                    "context), with loss by position bucket over whole windows; sequence-parallel for long "
                    "lengths. Writes ppl.json and ppl.png (perplexity vs length, one line per model).")
    _common_args(ppl, model_required=False)
    data = _PPL.data
    ppl.add_argument("--data", action="append", metavar="SRC",  # no list default: append would extend it
                     help="corpus source, repeatable: file, directory, glob, 'stdlib' or 'hf:NAME' "
                          f"(default {','.join(data.sources)})")
    ppl.add_argument("--max-documents", type=int, default=data.max_documents, help="use at most this many documents")
    ppl.add_argument("--text-field", default=data.text_field, help="jsonl/parquet field holding the text")
    ppl.add_argument("--data-seed", type=int, default=data.seed, help="document shuffle seed")
    ppl.add_argument("--cache-dir", default=data.cache_dir, help="tokenized/packed data cache")
    ppl.add_argument("--num-sequences", type=int, default=_PPL.num_sequences,
                     help="sequences per length (default %(default)s)")
    ppl.add_argument("--buckets", type=int, default=_PPL.buckets,
                     help="position buckets per window (default %(default)s)")
    ppl.add_argument("--stride", type=int, default=_PPL.stride,
                     help="tokens scored per window, the same tokens at every length (default: shortest length / 2)")
    ppl.add_argument("--windows", type=int, default=_PPL.windows,
                     help="windows per sequence, each `stride` further (default %(default)s); scored tokens per "
                          "length = num-sequences x windows x stride")
    ppl.add_argument("--compare", action="append", metavar="RESULT.json",
                     help="add another ppl.json (or its directory) to the table and plot; repeatable. "
                          "Without --model, only merges and plots the given results")
    ppl.set_defaults(func=run_ppl_command)
    pk = evals.add_parser(
        "passkey", help="passkey retrieval accuracy by length and depth",
        description="A random 5-digit pass key hidden at each depth of filler text; the model must "
                    "reproduce it greedily. Writes passkey.json and passkey.png (accuracy heat map).")
    _common_args(pk, model_required=True)
    pk.add_argument("--depths", default=",".join(f"{d:g}" for d in _PASSKEY.depths),
                    help="needle depths in [0, 1] (default %(default)s)")
    pk.add_argument("--trials", type=int, default=_PASSKEY.trials,
                    help="random keys per (length, depth) (default %(default)s)")
    pk.add_argument("--seed", type=int, default=_PASSKEY.seed, help="seed of the random keys (default %(default)s)")
    pk.set_defaults(func=run_passkey_command)


# ----------------------------------------------------------------------------- jobs (all ranks)

def _log(line: str) -> None:
    print(line, flush=True)


def _setup(opts: dict):
    """Tokenizer, model and mesh of this rank (mesh None outside a distributed job)."""
    mesh = None
    if dist.is_initialized():
        mesh = init_mesh(opts["sp_size"], opts["ulysses_size"])
    tokenizer = load_tokenizer(opts["tokenizer"] or opts["model"])
    model = load_model(opts["model"], dtype=opts["dtype"], rope=opts["rope"])
    return tokenizer, model, mesh


def _parallel_kw(opts: dict) -> dict:
    return dict(attention=opts["attention"], layout=opts["layout"], fused_rope=opts["fused_rope"], log=_log)


def score_ppl(model, tokenizer, cfg: PerplexityEvalConfig, **kw) -> dict:
    """`evaluate_perplexity` with the settings of `cfg`; the result names its data."""
    result = evaluate_perplexity(model, tokenizer, cfg.data, parse_token_list(cfg.lengths),
                                 num_sequences=cfg.num_sequences, buckets=cfg.buckets, stride=cfg.stride,
                                 windows=cfg.windows, **kw)
    return dict(result, data=dataclasses.asdict(cfg.data))


def score_passkey(model, tokenizer, cfg: PasskeyEvalConfig, **kw) -> dict:
    return evaluate_passkey(model, tokenizer, parse_token_list(cfg.lengths), cfg.depths, trials=cfg.trials,
                            seed=cfg.seed, **kw)


def ppl_job(opts: dict) -> dict:
    tokenizer, model, mesh = _setup(opts)
    return score_ppl(model, tokenizer, opts["ppl"], mesh=mesh, **_parallel_kw(opts))


def passkey_job(opts: dict) -> dict:
    tokenizer, model, mesh = _setup(opts)
    return score_passkey(model, tokenizer, opts["passkey"], mesh=mesh, **_parallel_kw(opts))


# ----------------------------------------------------------------------------- outputs (rank 0)

def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("_") or "model"


def _write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_ppl(result: dict, out, compare=()) -> tuple[Path, Path]:
    """<out>/ppl.json (the result, with `compare`: the other results) and <out>/ppl.png."""
    out = Path(out)
    result = dict(result, compare=list(compare))
    _write_json(result, out / "ppl.json")
    png = plot_perplexity([result, *compare], out / "ppl.png")
    return out / "ppl.json", png


def write_passkey(result: dict, out) -> tuple[Path, Path]:
    out = Path(out)
    _write_json(result, out / "passkey.json")
    return out / "passkey.json", plot_passkey(result, out / "passkey.png")


def load_result(path, kind: str) -> dict:
    """A result JSON written by `seqpar eval KIND` (or the directory holding it), without
    its own comparisons."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{kind}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SeqparError(f"cannot read the {kind} result {path} ({exc}); pass a {kind}.json written by "
                          f"`seqpar eval {kind}` or its directory.") from None
    if result.get("eval") != kind:
        raise SeqparError(f"{path} is not a `seqpar eval {kind}` result (eval={result.get('eval')!r}).")
    result.pop("compare", None)
    result.setdefault("label", path.parent.name or path.stem)
    return result


def _unique_labels(results: list[dict]) -> None:
    seen: dict = {}
    for r in results:
        label = r.get("label") or "model"
        seen[label] = seen.get(label, 0) + 1
        r["label"] = label if seen[label] == 1 else f"{label} ({seen[label]})"


# ----------------------------------------------------------------------------- commands

def _options(args, lengths: list[int]) -> dict:
    rope = None
    if args.rope_method:
        target = parse_tokens(args.rope_target) if args.rope_target else max(lengths)
        rope = {"target_len": target, "method": args.rope_method, "factor": args.rope_factor,
                "rope_theta": args.rope_theta, "original_max_position_embeddings": args.rope_original_length}
    elif any(v is not None for v in (args.rope_factor, args.rope_theta, args.rope_original_length,
                                     args.rope_target)):
        raise SeqparError("--rope-factor/--rope-theta/--rope-original-length/--rope-target need --rope-method.")
    _check_run_args(args)
    return {"model": args.model, "tokenizer": args.tokenizer, "dtype": args.dtype, "lengths": lengths,
            "sp_size": args.sp_size, "ulysses_size": args.ulysses_size, "attention": args.attention,
            "layout": args.layout, "fused_rope": args.fused_rope, "rope": rope}


def _check_run_args(args) -> None:
    """Before any rank starts: sizes that make sense, and a model directory that exists
    (nothing is downloaded, so a missing directory would only surface later as a
    confusing tokenizer or Hub error)."""
    if args.sp_size < 1:
        raise SeqparError(f"--sp-size must be at least 1, got {args.sp_size}.")
    if args.ulysses_size < 1 or args.sp_size % args.ulysses_size:
        raise SeqparError(f"--ulysses-size must be at least 1 and divide --sp-size {args.sp_size}, "
                          f"got {args.ulysses_size}.")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SeqparError(f"--model {args.model!r} is not a model directory (no config.json there; relative "
                          f"paths resolve against {os.getcwd()!r}); give the directory of a `seqpar train` "
                          f"export (checkpoint.export_hf) or of save_pretrained.")


def _label(args, rope) -> str:
    if args.label:
        return args.label
    label = Path(args.model).resolve().name
    if rope:
        label += f"+{rope['method']}" + (f"x{rope['factor']:g}" if rope.get("factor") else "")
    return label


def _describe(result: dict, args, opts: dict) -> dict:
    return dict(result, label=_label(args, opts["rope"]), model=str(Path(args.model).resolve()),
                rope=opts["rope"])


def run_ppl_command(args) -> int:
    compare = [load_result(p, "ppl") for p in args.compare or []]
    if args.model is None:
        if not compare:
            raise SeqparError("give --model DIR and --lengths to evaluate, or --compare RESULT.json ... "
                              "to merge and plot existing results.")
        result, compare = compare[0], compare[1:]
    else:
        if not args.lengths:
            raise SeqparError("--lengths is required with --model, e.g. --lengths 1k,2k,4k.")
        opts = _options(args, parse_token_list(args.lengths))
        multiple = args.sp_size * (2 if args.layout == "zigzag" else 1)
        if any(n % multiple for n in opts["lengths"]):  # before any rank starts
            raise SeqparError(f"every --lengths value must be a multiple of {multiple} ({args.layout} layout over "
                              f"--sp-size {args.sp_size}); got {opts['lengths']}.")

        stride = args.stride or default_stride(opts["lengths"])
        window_ends(opts["lengths"], stride, args.windows)  # bad stride/windows: fail before any rank starts
        data = DataConfig(sources=args.data or list(_PPL.data.sources), max_documents=args.max_documents,
                          text_field=args.text_field, cache_dir=args.cache_dir, seed=args.data_seed)
        opts["ppl"] = PerplexityEvalConfig(lengths=args.lengths, data=data, num_sequences=args.num_sequences,
                                           buckets=args.buckets, stride=stride, windows=args.windows)
        result = _describe(launch(ppl_job, opts, args.sp_size), args, opts)
        if not _is_writer():
            return 0
    _unique_labels([result, *compare])
    out = Path(args.out or Path("runs/eval") / _slug(result["label"]))
    paths = write_ppl(result, out, compare)
    print("\n" + ppl_markdown([result, *compare]) + "\n")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def run_passkey_command(args) -> int:
    opts = _options(args, parse_token_list(args.lengths))
    try:
        depths = [float(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise SeqparError(f"--depths {args.depths!r}: give fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1.") from None
    opts["passkey"] = PasskeyEvalConfig(lengths=args.lengths, depths=depths, trials=args.trials, seed=args.seed)
    result = _describe(launch(passkey_job, opts, args.sp_size), args, opts)
    if not _is_writer():
        return 0
    paths = write_passkey(result, Path(args.out or Path("runs/eval") / _slug(result["label"])))
    print("\n" + passkey_markdown(result) + "\n")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


# ----------------------------------------------------------------------------- trainer hook

def run_evals(model_dir, eval_cfg: EvalConfig, *, mesh=None, log=_log) -> dict:
    """Evaluate a saved model directory, e.g. at the end of a training stage: the
    evaluations `eval_cfg` configures (its `ppl` / `passkey` sections; None: not run).

    In a distributed job every rank calls it with the job's `mesh` (e.g. the trainer's:
    sequences are sharded as in training); rank 0 writes the JSON and PNG files under
    `eval_cfg.out` (default <model_dir>/eval). Returns {"ppl": result, "passkey": result}
    for the evaluations run.
    """
    if not eval_cfg.enabled:
        return {}
    out = Path(eval_cfg.out or Path(model_dir) / "eval")
    label = eval_cfg.label or Path(model_dir).resolve().name
    tokenizer = load_tokenizer(eval_cfg.tokenizer or model_dir)
    model = load_model(model_dir, dtype=eval_cfg.dtype)
    kw = dict(mesh=mesh, attention=eval_cfg.attention, layout=eval_cfg.layout, log=log)
    about = dict(label=label, model=str(Path(model_dir).resolve()))
    results = {}
    if eval_cfg.ppl is not None:
        results["ppl"] = dict(score_ppl(model, tokenizer, eval_cfg.ppl, **kw), **about)
        if _is_writer():
            write_ppl(results["ppl"], out)
    if eval_cfg.passkey is not None:
        results["passkey"] = dict(score_passkey(model, tokenizer, eval_cfg.passkey, **kw), **about)
        if _is_writer():
            write_passkey(results["passkey"], out)
    return results
