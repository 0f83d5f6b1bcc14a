"""`seqpar bench memory`: peak memory per rank of real training steps (random weights,
random tokens, spawned ranks, each variant and length), measured side by side with plain
transformers + DeepSpeed and with what `seqpar plan` predicts.

    seqpar bench memory --model configs/models/bench_small.json --seq-len 2048,4096 \
        --world-size 2 --zero 2

Each (variant, length) runs in its own W spawned processes (`run_distributed`): the model
is built from its config (random weights), wrapped by DeepSpeed (`seqpar.train.engine`,
the same code as `seqpar train`), and trained for `--steps` steps on random tokens. The
reading is the peak over those steps above the memory in use just before the model was
built, so it holds parameters, gradients, optimizer states, activations and buffers.

Variants:
- ``transformers``: the model as transformers builds it (SDPA attention, its own loss),
  data parallel over the W ranks, so every rank holds the whole sequence;
- ``seqpar``: sequence parallel over the W ranks (ring attention, tiled loss);
- ``+ckpt``: and gradient checkpointing; ``+tiled-mlp``: and the tiled MLP;
- ``+tiled-layer``: and every token-wise part of each layer tiled (`parallel.tiled_layer`,
  same tile size);
- ``+head-groups``: and the tiled layer's attention in `--head-groups` groups of heads
  (`parallel.head_groups`; default one per query head, the smallest working set);
- ``+offload``: and the checkpointed activations kept in CPU memory (CUDA only: on CPU
  ranks the offload target is the same memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from ..commands import about
from ..errors import SeqparError
from ..model import enable_checkpointing, parallelize, shard_batch
from ..parallel import init_mesh
from ..parallel.head_groups import check_head_groups
from ..parallel.spawn import DistributedRunError, run_distributed
from ..plan.cli import max_seq_len
from ..plan.memory import ModelShape, estimate, run_shape
from ..runtime import resolve_dtype
from ..tables import markdown_table
from ..train.config import RunConfig
from ..train.engine import deepspeed_config, initialize_engine, sp_loss_scale
from ..train.model_loader import load_model, model_config
from ..units import GIB, MIB, parse_bytes
from .attention import PeakMemory

VARIANTS = ("transformers", "seqpar", "+ckpt", "+tiled-mlp", "+tiled-layer", "+head-groups", "+offload")


@dataclass
class Variant:
    name: str
    seqpar: bool = True
    gradient_checkpointing: bool = False
    tiled_mlp: int | None = None
    offload_activations: bool = False
    tiled_layer: int | None = None
    head_groups: int = 1
    loss_chunk: int | None = None  # the tiled loss's chunk in tokens (None: seqpar's default)


def variants(names, tile: int, head_groups: int | None = None) -> list[Variant]:
    """Each named variant; the '+' ones add their feature to all before them.
    `head_groups`: the number of groups of +head-groups."""
    out, ckpt, mlp, layer, offload, groups = [], False, None, None, False, 1
    for name in VARIANTS:
        ckpt = ckpt or name == "+ckpt"
        mlp = tile if (mlp or name == "+tiled-mlp") else None
        layer = tile if (layer or name in ("+tiled-layer", "+head-groups")) else None
        groups = head_groups if name == "+head-groups" else groups
        offload = offload or name == "+offload"
        if name in names:
            out.append(Variant(name, seqpar=name != "transformers", gradient_checkpointing=ckpt,
                               tiled_mlp=mlp, offload_activations=offload, tiled_layer=layer,
                               head_groups=groups))
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SeqparError(f"unknown --variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}.")
    return out


def _fixed_malloc() -> None:
    """Make glibc hand big blocks straight back to the OS (a fixed mmap threshold), so
    RSS follows the tensors alive instead of what malloc's free lists still hold."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _run_config(model_file, variant: Variant, seq_len, zero_json, dtype):
    cfg = RunConfig()
    cfg.model.config_file = model_file
    cfg.model.dtype = dtype
    cfg.model.gradient_checkpointing = variant.gradient_checkpointing
    cfg.train.seq_len = seq_len
    cfg.train.deepspeed_config = zero_json
    cfg.parallel.tiled_mlp = variant.tiled_mlp
    cfg.parallel.offload_activations = variant.offload_activations
    cfg.parallel.tiled_layer = variant.tiled_layer
    cfg.parallel.head_groups = variant.head_groups
    cfg.parallel.loss_chunk = variant.loss_chunk
    return cfg


def _build(model_file, variant: Variant, seq_len, zero_json, dtype, mark, config=None):
    """Build and wrap the model; returns (engine, mesh, config, loss scale, hf_ds): keep
    the last alive while training (ZeRO-3)."""
    cfg = _run_config(model_file, variant, seq_len, zero_json, dtype)
    mesh = init_mesh(torch.distributed.get_world_size() if variant.seqpar else 1)
    config = config or model_config(cfg)
    if not variant.seqpar:
        config._attn_implementation = "sdpa"
    ds = deepspeed_config(cfg, mesh.dp_size, resolve_dtype(dtype) == torch.bfloat16)
    # On a GPU the weights are initialized there: one CPU thread per rank takes over a
    # minute for a 1B model. The memory reading is the same, they end up there anyway.
    device = _rank_device()
    with device if device.type == "cuda" else contextlib.nullcontext():
        model, hf_ds = load_model(cfg, ds, config)
    if variant.seqpar:
        parallelize(model, mesh, tiled_mlp=variant.tiled_mlp, tiled_layer=variant.tiled_layer,
                    head_groups=variant.head_groups, loss_chunk=variant.loss_chunk,
                    offload_activations=variant.offload_activations)
    if variant.gradient_checkpointing:
        enable_checkpointing(model)
    mark("model built")
    engine = initialize_engine(model, cfg, mesh, ds)
    mark("engine ready")
    scale = sp_loss_scale(ds, mesh.sp_size) if variant.seqpar else 1.0
    return engine, mesh, config, scale, hf_ds


def _steps(engine, mesh, variant: Variant, config, scale, seq_len, steps, generator, mark, losses):
    """Train `steps` steps on random tokens of `seq_len`, appending each loss."""
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator)
        batch = shard_batch({"input_ids": ids}, mesh) if variant.seqpar else \
            {"input_ids": ids, "labels": ids}
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss * scale)
        engine.step()
        losses.append(float(loss.detach()))
        mark(f"step {len(losses)}")
    return losses


def _train(model_file, variant: Variant, seq_len, zero_json, dtype, steps, seed, mark, config=None):
    """Build, wrap and train `steps` steps on random tokens; `mark(name)` after each phase."""
    engine, mesh, config, scale, hf_ds = _build(model_file, variant, seq_len, zero_json, dtype, mark, config)
    losses = _steps(engine, mesh, variant, config, scale, seq_len, steps, torch.Generator().manual_seed(seed),
                    mark, [])
    engine.destroy()
    del hf_ds
    return losses


def _prime(model_file, variant: Variant, zero_json, dtype, seed) -> None:
    """Run the same code once on a tiny copy of the model, so that what the first run
    of a process loads for good (Python modules, DeepSpeed's comm ops and their shared
    buffers, allocator arenas) is in the baseline and not counted as the run's."""
    config = model_config(_run_config(model_file, variant, 64, zero_json, dtype))
    for name, value in {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                        "vocab_size": 256, "head_dim": 16,
                        "num_attention_heads": config.num_attention_heads // config.num_key_value_heads * 2,
                        "num_key_value_heads": 2}.items():
        setattr(config, name, value)
    if variant.head_groups > 1:  # groups that fit the copy's two K/V heads
        variant = replace(variant, head_groups=2)
    _train(model_file, variant, 64, zero_json, dtype, 1, seed, lambda name: None, config=config)
    gc.collect()


def _rank_steps(model_file, variant_dict, seq_len, zero_json, dtype, steps, seed):
    """Runs on each rank: prime, then measure `_train` from a baseline."""
    _fixed_malloc()

    variant = Variant(**variant_dict)
    _prime(model_file, variant, zero_json, dtype, seed)
    mem, phases, mark = _meter(_rank_device())
    t0 = time.perf_counter()
    losses = _train(model_file, variant, seq_len, zero_json, dtype, steps, seed, mark)
    seconds = (time.perf_counter() - t0) / steps
    return {"memory": mem.result(), "phases": phases, "losses": losses, "step_s": seconds}


def _rank_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _meter(device):
    """A PeakMemory started now (before the model exists: everything after is counted),
    the phases dict and `mark(name)`, which records the memory in use above the baseline
    and the peak so far under that name."""
    mem = PeakMemory(device)
    mem.start()
    mem.reset_peak()
    phases = {}

    def mark(name):
        now = mem.result()
        phases[name] = {"now": now["now_bytes"] - mem.baseline, "peak": now["peak_extra_bytes"]}
    return mem, phases, mark


def _rank_until_oom(model_file, variant_dict, seq_lens, zero_json, dtype, steps, seed, cap_bytes=None):
    """Runs on the one rank of `--until-oom`: build the model once, then train
    `steps` steps at each length in ascending order, stopping at the first that runs out
    of memory. A length's peak is that of its own steps (peak statistics reset before
    them; the first length's also covers the build, as a fresh run's does) above the
    memory in use before the model was built, so the model states count at every length.
    `cap_bytes` (CUDA): the most this process may allocate, as on a GPU of that size."""
    _fixed_malloc()
    if cap_bytes and dist.get_backend() == "nccl":
        device = _rank_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / torch.cuda.mem_get_info(device)[1]), device)
    variant = Variant(**variant_dict)
    _prime(model_file, variant, zero_json, dtype, seed)
    mem, phases, mark = _meter(_rank_device())
    engine, mesh, config, scale, hf_ds = _build(model_file, variant, seq_lens[0], zero_json, dtype, mark)
    generator, results = torch.Generator().manual_seed(seed), []
    for i, s in enumerate(seq_lens):
        if i:
            mem.reset_peak()
        phases.clear()
        t0, losses = time.perf_counter(), []
        try:
            _steps(engine, mesh, variant, config, scale, s, steps, generator, mark, losses)
        except torch.OutOfMemoryError as e:
            detail = str(e).strip().split(". ")[0]  # "... Tried to allocate X GiB"
            results.append({"seq_len": s, "error": "out of memory", "detail": detail})
            print(f"[bench memory] {variant.name} S={s}: out of memory: {detail}", file=sys.stderr, flush=True)
            break  # the engine is mid-step now: nothing longer is tried in this process
        results.append({"seq_len": s, "memory": mem.result(), "phases": dict(phases), "losses": losses,
                        "step_s": (time.perf_counter() - t0) / steps, "error": None})
        print(f"[bench memory] {variant.name} S={s}: peak {results[-1]['memory']['peak_extra_bytes'] / MIB:.0f} MiB",
              file=sys.stderr, flush=True)
    del hf_ds
    return results


def run_memory_bench(model_file, seq_lens, *, world_size=2, zero=2, dtype="float32",
                     variant_names=VARIANTS, tile=1024, head_groups=None, loss_chunk=None, steps=2,
                     device="cpu", seed=0,
                     timeout=3600.0, out=None, json_path=None, until_oom=False, gpu_mem=None) -> list[dict]:
    """Measure every variant at every length, with the planner's prediction beside it.
    Each row is reported (and `json_path` rewritten) as soon as it is measured, so a run
    cut short by a time limit keeps what it measured. `until_oom` (one CUDA rank): each
    variant builds its model once and tries the lengths in ascending order until one runs
    out of memory (a row with error "out of memory"; longer lengths get no row), and a
    second table gives the longest that ran next to the planner's longest for the same
    memory (`gpu_mem` bytes: a cap on what the rank may allocate, default the GPU's)."""
    bench = _Bench(model_file, world_size, zero, dtype, device, json_path)
    head_groups = head_groups or _heads(model_file)[0]  # default: one per query head
    chosen = [replace(v, loss_chunk=loss_chunk if v.seqpar else None)
              for v in variants(variant_names, tile, head_groups) if not (v.name == "+offload" and device == "cpu")]
    if until_oom:
        capacity = gpu_mem or (torch.cuda.mem_get_info()[1] if device == "cuda" else None)
        for v in chosen:
            bench.until_oom(v, sorted(seq_lens), steps, seed, timeout, gpu_mem, capacity)
    else:
        for s in seq_lens:
            for v in chosen:
                bench.fixed_length(v, s, steps, seed, timeout)
    print(format_table(bench.rows), file=out or sys.stdout, flush=True)
    if bench.limits:
        print("\n" + format_limits(bench.limits), file=out or sys.stdout, flush=True)
    return bench.rows


class _Bench:
    """The runs of one `run_memory_bench`: each row reported, with the plan, as measured."""

    def __init__(self, model_file, world_size, zero, dtype, device, json_path):
        self.model_file, self.world_size, self.zero, self.dtype = model_file, world_size, zero, dtype
        self.device, self.json_path = device, json_path
        self.zero_json = f"configs/deepspeed/zero{zero}.json"
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.rows, self.limits = [], []

    def fixed_length(self, v: Variant, s, steps, seed, timeout):
        print(f"[bench memory] {v.name} S={s} W={self.world_size} ZeRO-{self.zero}: running...",
              file=sys.stderr, flush=True)
        try:
            by_rank = run_distributed(_rank_steps, self.world_size, self.model_file, asdict(v), s, self.zero_json,
                                      self.dtype, steps, seed, backend=self.backend, timeout=timeout)
            self.report(v, s, by_rank)
        except DistributedRunError as exc:
            self.report(v, s, None, str(exc).strip().splitlines()[-1])

    def until_oom(self, v: Variant, seq_lens, steps, seed, timeout, gpu_mem, capacity):
        print(f"[bench memory] {v.name} S={','.join(map(str, seq_lens))} until out of memory: running...",
              file=sys.stderr, flush=True)
        try:
            (results,) = run_distributed(_rank_until_oom, 1, self.model_file, asdict(v), seq_lens, self.zero_json,
                                         self.dtype, steps, seed, gpu_mem, backend=self.backend, timeout=timeout)
        except DistributedRunError as exc:
            self.report(v, seq_lens[0], None, str(exc).strip().splitlines()[-1])
            return
        for r in results:
            self.report(v, r["seq_len"], [r] if r["error"] is None else None, r["error"])
        if capacity:
            run, shape = self._run(v, seq_lens[0])
            self.limits.append(_limit(v, [r for r in self.rows if r["variant"] == v.name], capacity,
                                      max_seq_len(shape, run, capacity, 1024)))
            self._save()

    def _run(self, v: Variant, s):
        """The planner's (RunShape, ModelShape) of this variant at `s` tokens."""
        cfg = _run_config(self.model_file, v, s, self.zero_json, self.dtype)
        cfg.parallel.sp_size = self.world_size if v.seqpar else 1
        run = run_shape(cfg, self.world_size, device=self.device, plain_transformers=not v.seqpar)
        return run, ModelShape.from_config(model_config(cfg))

    def report(self, v: Variant, s, by_rank, error=None):
        run, shape = self._run(v, s)
        r = _row(v, s, self.world_size, self.zero, self.dtype, estimate(shape, run), by_rank, error)
        self.rows.append(r)
        result = f"peak {r['measured_peak_bytes'] / MIB:.0f} MiB, {r['step_s']:.2f} s/step" \
            if r["measured_peak_bytes"] else r["error"]
        print(f"[bench memory] {v.name} S={s}: {result} (plan {r['predicted_peak_bytes'] / MIB:.0f} MiB)",
              file=sys.stderr, flush=True)
        self._save()

    def _save(self):
        if self.json_path:
            write_json(self.rows, self.json_path, self.limits)


def _limit(v: Variant, rows, capacity, planner_longest) -> dict:
    ran = [r["seq_len"] for r in rows if r["error"] is None]
    oom = [r["seq_len"] for r in rows if r["error"] == "out of memory"]
    return {"variant": v.name, "capacity_bytes": capacity, "longest_ran": max(ran, default=None),
            "out_of_memory_at": min(oom, default=None), "planner_longest": planner_longest}


def format_limits(limits) -> str:
    cells = [[x["variant"], f"{x['capacity_bytes'] / GIB:.1f}", x["longest_ran"] or "-",
              x["out_of_memory_at"] or "not reached", x["planner_longest"]] for x in limits]
    lines = markdown_table(["variant", "memory GiB", "longest that ran", "out of memory at",
                            "planner's longest"], cells, "lrrrr")
    return "\n".join(lines + ["", "longest that ran / out of memory at: the --seq-len values tried in "
                                   "ascending order (--until-oom); planner's longest: `seqpar plan`'s largest "
                                   "multiple of 1024 tokens predicted to fit in the same memory."])


def _row(v: Variant, s, world_size, zero, dtype, predicted, by_rank, error) -> dict:
    """One table row: the largest peak over the ranks (None with `error`) and the plan."""
    measured = step_s = loss = phases = None
    if by_rank:
        peaks = [x["memory"]["peak_extra_bytes"] for x in by_rank]
        measured, step_s, loss = max(peaks), by_rank[0]["step_s"], by_rank[0]["losses"][-1]
        phases = by_rank[peaks.index(measured)]["phases"]
    return {"variant": v.name, "seq_len": s, "world_size": world_size, "zero": zero, "dtype": dtype,
            "measured_peak_bytes": measured, "predicted_peak_bytes": predicted.total,
            "predicted": predicted.as_dict(), "error": error, "step_s": step_s, "loss": loss, "phases": phases}


def format_table(rows) -> str:
    cells = []
    for r in rows:
        base = next((b for b in rows if b["variant"] == "transformers" and b["seq_len"] == r["seq_len"]
                     and b["measured_peak_bytes"]), None)
        m, p = r["measured_peak_bytes"], r["predicted_peak_bytes"]
        measured = f"{m / MIB:.0f}" if m else r["error"]
        vs_base = f"{m / base['measured_peak_bytes']:.3f}" if m and base else "-"
        accuracy = f"{p / m:.3f}" if m else "-"
        cells.append([r["variant"], r["seq_len"], r["world_size"], r["zero"], measured, vs_base, f"{p / MIB:.0f}",
                      accuracy, r["predicted"]["peak_moment"]])
    lines = markdown_table(["variant", "seq len", "W", "ZeRO", "measured peak MiB", "vs transformers", "predicted MiB",
                            "predicted / measured", "predicted peak at"], cells, "lrrrrrrrl")
    lines += ["", "measured: per-rank peak (max over ranks) of the training steps above the memory in "
              "use before the model was built (CPU: VmHWM/RSS with a fixed malloc mmap threshold; "
              "CUDA: torch.cuda.max_memory_allocated); predicted: `seqpar plan`'s model of the same run."]
    return "\n".join(lines)


def write_json(rows, path, limits=()) -> None:
    with open(path, "w") as f:
        json.dump({"rows": rows, "limits": list(limits)}, f, indent=1)


def add_parser(benches) -> None:
    p = benches.add_parser(
        "memory", help="peak memory per rank of real training steps vs plain transformers and `seqpar plan`",
        description=about(__doc__))
    p.add_argument("--model", default="configs/models/bench_small.json", metavar="CONFIG",
                   help="model config file (random init; default configs/models/bench_small.json)")
    p.add_argument("--seq-len", default="2048,4096", help="comma-separated token counts")
    p.add_argument("--world-size", type=int, default=2, help="ranks; seqpar variants use SP = all of them")
    p.add_argument("--zero", type=int, choices=(1, 2, 3), default=2, help="ZeRO stage (configs/deepspeed/zeroN.json)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--tiled-mlp", type=int, default=1024,
                   help="tokens per tile for +tiled-mlp and +tiled-layer")
    p.add_argument("--head-groups", type=int, default=None, metavar="G",
                   help="groups of heads for +head-groups (parallel.head_groups; default: one per query head)")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per chunk of seqpar's tiled loss (parallel.loss_chunk; default: 256 MiB of "
                        "float32 logits, the whole shard for a small vocabulary)")
    p.add_argument("--steps", type=int, default=2, help="training steps per run (the peak is over all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: nccl, one GPU per rank")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed per run (with --until-oom: per variant, all its lengths)")
    p.add_argument("--until-oom", action="store_true",
                   help="the longest length that fits: each variant builds its model once and tries --seq-len "
                        "in ascending order until one runs out of memory (--device cuda --world-size 1)")
    p.add_argument("--gpu-mem", type=parse_bytes, metavar="BYTES",
                   help="with --until-oom: the most the rank may allocate (e.g. 32GiB), as on a GPU of that "
                        "size, so the longest length is found at lengths that run in seconds")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.set_defaults(func=_run_cli)


def _heads(model_file) -> tuple[int, int]:
    """(query heads, K/V heads) of the model's config file."""
    with open(model_file) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


def _run_cli(args) -> int:
    if args.device == "cuda":
        if torch.cuda.device_count() < args.world_size:
            raise SeqparError(f"--device cuda needs {args.world_size} GPUs (one per rank); "
                              f"{torch.cuda.device_count()} visible. Lower --world-size or use --device cpu.")
    if args.until_oom and (args.device != "cuda" or args.world_size != 1):
        raise SeqparError("--until-oom needs --device cuda --world-size 1: only one rank can recover from "
                          "running out of memory (others would wait in a collective), and CPU ranks are "
                          "killed by the OS instead. Drop --until-oom, or run it on one GPU.")
    if args.gpu_mem and not args.until_oom:
        raise SeqparError("--gpu-mem caps the memory of an --until-oom search; add --until-oom or drop --gpu-mem.")
    if args.world_size < 1 or args.steps < 1:
        raise SeqparError("--world-size and --steps must be at least 1.")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants(names, args.tiled_mlp)  # unknown names fail here, before any process starts
    if args.head_groups is not None:
        check_head_groups(*_heads(args.model), args.head_groups)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rows = run_memory_bench(args.model, [int(x) for x in args.seq_len.split(",")], world_size=args.world_size,
                            zero=args.zero, dtype=dtype, variant_names=names, tile=args.tiled_mlp,
                            head_groups=args.head_groups, loss_chunk=args.loss_chunk,
                            steps=args.steps, device=args.device, timeout=args.timeout, json_path=args.json,
                            until_oom=args.until_oom, gpu_mem=args.gpu_mem)
    fine = (None, "out of memory") if args.until_oom else (None,)
    return 0 if all(r["error"] in fine for r in rows) else 1
