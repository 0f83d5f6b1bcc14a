"""`seqpar study extend CONFIG`: the context-extension methods table at small scale. A
small model pretrained at L is extended to 4L/8L with none / PI / dynamic NTK / ABF / YaRN
/ Llama-3 RoPE, zero-shot and after the same short continued pretraining (SP=4 ring,
ZeRO); perplexity on the same tokens at L..8L and passkey by depth. Writes results.json,
table.md and study.png; finished steps are reused on a rerun.

1. Corpus: real text (stdlib sources) + synthetic passkey-retrieval documents
   (`retrieval_data`), written as jsonl under OUT/data.
2. Base model: a small random-init Llama pretrained at L tokens (`seqpar train`, one rank).
3. Zero-shot: the base weights with each RoPE method at each factor f (target f*L).
4. Continued pretraining (CPT) of the base at f*L for each (method, f): the same data,
   the same steps, SP=4 zigzag ring attention, DeepSpeed ZeRO (`launch/cpu_gloo.sh`).
5. Every model: perplexity at L, 2L, 4L, 8L on the same held-out tokens (`seqpar.eval`,
   same-token protocol) and passkey accuracy per length and depth.
6. OUT/results.json, OUT/table.md, OUT/study.png, and the literature's qualitative
   ordering checked point by point (`report`).

Methods: none (no scaling; its CPT raises max_position_embeddings only), linear (PI),
dynamic (NTK), abf (rope_theta x f^abf_theta_exponent), yarn, llama3. Every step whose
output exists is skipped, so a rerun continues an interrupted study.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..commands import about, add_group
from ..data import load_tokenizer
from ..errors import SeqparError
from ..eval.passkey import COMPACT, evaluate_passkey
from ..eval.perplexity import evaluate_perplexity
from ..eval.runner import load_model
from .report import write_report
from .retrieval_data import held_out_dir, real_text_files, write_corpus

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("none", "linear", "dynamic", "abf", "yarn", "llama3")

DEFAULTS = {
    "out": "runs/studies/extend",
    "model_config": "configs/models/quickstart_llama.json",
    "base_length": 128,
    "factors": [4, 8],
    "methods": list(METHODS),
    "eval_multiples": [1, 2, 4, 8],
    "abf_theta_exponent": 2.0,
    "seed": 0,
    "data": {"real_files": 300, "pretrain_retrieval_docs": 3000, "cpt_retrieval_docs": 600},
    "pretrain": {"steps": 600, "micro_batch_size": 16, "lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_steps": 30,
                 "grad_clip": 1.0},
    "cpt": {"steps": 30, "micro_batch_size": 1, "gradient_accumulation_steps": 2, "lr": 1.0e-3, "min_lr": 1.0e-4,
            "warmup_steps": 3, "grad_clip": 1.0, "sp_size": 4, "attention": "ring", "layout": "zigzag",
            "deepspeed_config": "configs/deepspeed/zero2.json"},
    # The study's own evaluation settings, not seqpar/eval_config.py's: its lengths follow
    # base_length x eval_multiples, its text is the held-out corpus, its defaults (32
    # sequences, 4 trials) are what the published table used, and results.json records them.
    "eval": {"num_sequences": 32, "stride": None, "buckets": 8, "passkey_depths": [0.0, 0.25, 0.5, 0.75, 1.0],
             "passkey_trials": 4},
    "fast": {},
}


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if key not in base:
            raise SeqparError(f"unknown study setting {where}{key!r}; known: {', '.join(sorted(base))}.")
        out[key] = _merge(base[key], value, f"{where}{key}.") if isinstance(base[key], dict) and key != "fast" \
            else value
    return out


def load_study(path, *, fast: bool = False, out=None) -> dict:
    """The study settings: DEFAULTS, overridden by the YAML file, then by its `fast:` section."""
    try:
        given = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise SeqparError(f"cannot read the study config {path} ({exc}).") from None
    cfg = _merge(DEFAULTS, given)
    if fast:
        cfg = _merge(cfg, cfg["fast"])
    cfg["fast_mode"] = fast
    if out:
        cfg["out"] = str(out)
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        raise SeqparError(f"unknown methods {bad}; choose from {', '.join(METHODS)}.")
    if cfg["cpt"]["sp_size"] < 1 or any(int(f) < 2 for f in cfg["factors"]):
        raise SeqparError("factors must be >= 2 and cpt.sp_size >= 1.")
    return cfg


class Study:
    def __init__(self, cfg: dict, log=print):
        self.cfg = cfg
        self.out = Path(cfg["out"])
        self.L = int(cfg["base_length"])
        self.lengths = [self.L * int(m) for m in cfg["eval_multiples"]]
        self.start = time.time()
        self._log = log
        self.base_theta = json.loads((ROOT / cfg["model_config"]).read_text()
                                     if not Path(cfg["model_config"]).is_absolute()
                                     else Path(cfg["model_config"]).read_text())["rope_parameters"]["rope_theta"]

    def log(self, msg: str) -> None:
        self._log(f"[study {time.time() - self.start:6.0f}s] {msg}")

    # ------------------------------------------------------------------ data
    def corpus(self, name: str, length: int, docs: int, seed: int) -> Path:
        path = self.out / "data" / f"{name}.jsonl"
        if not path.exists():
            info = write_corpus(path.with_suffix(".tmp"), real_files=real_text_files(self.cfg["data"]["real_files"]),
                                retrieval_docs=docs, length=length, template=COMPACT, seed=seed)
            path.with_suffix(".tmp").rename(path)
            path.with_suffix(".json").write_text(json.dumps(info, indent=2))
            self.log(f"corpus {name}: {info['real_documents']} real documents ({info['real_chars']} bytes), "
                     f"{info['retrieval_documents']} retrieval documents ({info['retrieval_chars']} bytes)")
        return path

    # ------------------------------------------------------------------ training
    def rope_section(self, method: str, factor: int, for_training: bool) -> dict | None:
        """The run config's rope section (or extend_context keywords when not for_training)."""
        target = self.L * factor
        if method == "none":
            # Same frequencies; training past L only needs the config to allow the length.
            return {"method": "abf", "rope_theta": self.base_theta} if for_training else None
        if method == "abf":
            rope = {"method": "abf", "rope_theta": self.base_theta * factor ** self.cfg["abf_theta_exponent"]}
        else:
            rope = {"method": method, "factor": float(factor), "original_max_position_embeddings": self.L}
        return rope if for_training else {"target_len": target, **rope}

    def train(self, name: str, run: dict) -> Path:
        run_dir = self.out / "runs" / name
        hf = run_dir / "hf"
        if (hf / "config.json").exists():
            self.log(f"train {name}: done before, reusing {hf}")
            return hf
        run = copy.deepcopy(run)
        run["checkpoint"] = {"dir": str(run_dir / "checkpoints"), "every": 0, "keep_last": 1, "export_hf": str(hf)}
        run["log"] = {"dir": str(run_dir / "logs"), "every": max(1, run["train"]["steps"] // 10),
                      "tensorboard": False}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
        env = dict(os.environ, PYTHON=sys.executable,
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.time()
        self.log(f"train {name}: {run['train']['steps']} steps at {run['train']['seq_len']} tokens, "
                 f"SP={run['parallel']['sp_size']} ...")
        with (run_dir / "train.log").open("w") as logf:
            proc = subprocess.run(["bash", str(ROOT / "launch" / "cpu_gloo.sh"), str(run_dir / "run.yaml")],
                                  cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not (hf / "config.json").exists():
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise SeqparError(f"training {name} failed (exit {proc.returncode}); log {run_dir / 'train.log'}:\n{tail}")
        losses = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        last = losses[-1]["loss"] if losses else float("nan")
        self.log(f"train {name}: done in {time.time() - t0:.0f} s, last logged loss {last:.4f}")
        return hf

    def base_run(self, corpus: Path) -> dict:
        p = self.cfg["pretrain"]
        return {"model": {"config_file": str(ROOT / self.cfg["model_config"]), "tokenizer": "byte", "dtype": "float32",
                          "seed": self.cfg["seed"]},
                "data": {"sources": [str(corpus)], "cache_dir": str(self.out / "cache"), "seed": self.cfg["seed"]},
                "parallel": {"sp_size": 1, "layout": "contiguous"},
                "train": {"seq_len": self.L, "optimizer": "adamw", **p,
                          "deepspeed_config": str(ROOT / self.cfg["cpt"]["deepspeed_config"])}}

    def cpt_run(self, base_hf: Path, corpus: Path, method: str, factor: int) -> dict:
        c = dict(self.cfg["cpt"])
        parallel = {"sp_size": c.pop("sp_size"), "attention": c.pop("attention"), "layout": c.pop("layout")}
        ds = str(ROOT / c.pop("deepspeed_config"))
        return {"model": {"name_or_path": str(base_hf), "tokenizer": str(base_hf), "dtype": "float32"},
                "data": {"sources": [str(corpus)], "cache_dir": str(self.out / "cache"), "seed": self.cfg["seed"]},
                "parallel": parallel, "rope": self.rope_section(method, factor, for_training=True),
                "train": {"seq_len": self.L * factor, "optimizer": "adamw", "deepspeed_config": ds, **c}}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, name: str, model_dir: Path, rope: dict | None) -> dict:
        path = self.out / "evals" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        e = self.cfg["eval"]
        t0 = time.time()
        tokenizer = load_tokenizer(str(model_dir))
        # A fresh model per evaluation: transformers' dynamic rope caches the longest length seen.
        ppl = evaluate_perplexity(load_model(model_dir, dtype="float32", rope=rope), tokenizer,
                                  {"sources": [held_out_dir()], "cache_dir": str(self.out / "cache")},
                                  self.lengths, num_sequences=e["num_sequences"], stride=e["stride"],
                                  buckets=e["buckets"])
        passkey = evaluate_passkey(load_model(model_dir, dtype="float32", rope=rope), tokenizer, self.lengths,
                                   e["passkey_depths"], trials=e["passkey_trials"], seed=1000 + self.cfg["seed"],
                                   template=COMPACT)
        result = {"name": name, "model": str(model_dir), "rope": rope, "ppl": ppl, "passkey": passkey}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        ppls = " ".join(f"{r['ppl']:.2f}" for r in ppl["lengths"])
        acc = " ".join(f"{sum(row) / len(row):.2f}" for row in passkey["accuracy"])
        self.log(f"eval {name}: ppl {ppls} | passkey {acc} (lengths {self.lengths}, {time.time() - t0:.0f} s)")
        return result

    # ------------------------------------------------------------------ the whole study
    def steps(self):
        """(name, method, factor, stage) of every evaluated model, in the order they run."""
        yield "base", "none", None, "base"
        for stage, prefix in (("zero-shot", "zero_shot"), ("cpt", "cpt")):
            for factor in self.cfg["factors"]:
                for method in self.cfg["methods"]:
                    if stage == "zero-shot" and method == "none":
                        continue  # zero-shot 'none' is the base model itself
                    yield f"{prefix}_{method}_x{factor}", method, factor, stage

    def run(self) -> dict:
        cfg, L = self.cfg, self.L
        self.out.mkdir(parents=True, exist_ok=True)
        d = cfg["data"]
        base_hf = self.train("base", self.base_run(self.corpus(f"pretrain_{L}", L, d["pretrain_retrieval_docs"],
                                                                  cfg["seed"])))
        corpora = {}
        for name, method, factor, stage in self.steps():
            if stage == "base":
                self.evaluate(name, base_hf, None)
            elif stage == "zero-shot":
                self.evaluate(name, base_hf, self.rope_section(method, factor, False))
            else:
                if factor not in corpora:
                    corpora[factor] = self.corpus(f"cpt_{L * factor}", L * factor, d["cpt_retrieval_docs"],
                                                  cfg["seed"] + factor)
                self.evaluate(name, self.train(name, self.cpt_run(base_hf, corpora[factor], method, factor)), None)
        return self.report()

    def report(self, partial: bool = False) -> dict:
        """results.json, table.md and study.png from the evaluations done so far (`partial`:
        some may be missing, e.g. a study stopped early; they show as '-')."""
        rows = []
        for name, method, factor, stage in self.steps():
            path = self.out / "evals" / f"{name}.json"
            if path.exists():
                rows.append({"method": method, "factor": factor, "stage": stage,
                             **self._short(json.loads(path.read_text()))})
            elif not partial:
                raise SeqparError(f"the study has no evaluation {path}; run it (without --report-only) first.")
        if not rows or rows[0]["stage"] != "base":
            raise SeqparError(f"no base-model evaluation under {self.out / 'evals'}: nothing to report.")
        done = len(rows) == sum(1 for _ in self.steps())
        results = {"study": "extend", "complete": done, "base_length": self.L, "lengths": self.lengths,
                   "factors": self.cfg["factors"], "methods": self.cfg["methods"],
                   "settings": {k: v for k, v in self.cfg.items() if k != "fast"},
                   "elapsed_s": round(time.time() - self.start, 1), "rows": rows}
        paths = write_report(results, self.out)
        self.log("wrote " + ", ".join(map(str, paths)) + ("" if done else f" ({len(rows)} of "
                                                            f"{sum(1 for _ in self.steps())} evaluations: partial)"))
        return results

    @staticmethod
    def _short(result: dict) -> dict:
        ppl, pk = result["ppl"], result["passkey"]
        return {"ppl": [r["ppl"] for r in ppl["lengths"]], "nll": [r["nll"] for r in ppl["lengths"]],
                "scored_tokens": [r["tokens"] for r in ppl["lengths"]],
                "ppl_buckets": [[b["nll"] for b in r["buckets"]] for r in ppl["lengths"]],
                "passkey": pk["accuracy"], "passkey_depths": pk["depths"], "passkey_trials": pk["trials"]}


def add_parser(commands) -> None:
    studies = add_group(commands, "study", help="studies that train and evaluate (e.g. context extension)",
                        metavar="STUDY")
    ext = studies.add_parser(
        "extend", help="context-extension methods table: zero-shot and after continued pretraining",
        description=about(__doc__))
    ext.add_argument("config", help="study YAML (e.g. configs/studies/extend/study.yaml)")
    ext.add_argument("--fast", action="store_true", help="the config's reduced `fast:` settings (CI)")
    ext.add_argument("--out", help="output directory (default: the config's `out`)")
    ext.add_argument("--report-only", action="store_true",
                     help="only (re)write results.json, table.md and study.png from the evaluations already "
                          "done (missing ones show as '-'), e.g. for a study stopped early")
    ext.set_defaults(func=_run_extend)


def _run_extend(args) -> int:
    cfg = load_study(args.config, fast=args.fast, out=args.out)
    study = Study(cfg, log=lambda m: print(m, flush=True))
    study.report(partial=True) if args.report_only else study.run()
    return 0
