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
- ``+offload``: and the checkpointed activations kept in CPU memory (CUDA only: on CPU
  ranks the offload target is the same memory).
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..commands import about
from ..errors import SeqparError
from ..model import enable_checkpointing, parallelize, shard_batch
from ..parallel import init_mesh
from ..parallel.spawn import DistributedRunError, run_distributed
from ..plan.memory import plan_for_run
from ..runtime import resolve_dtype
from ..tables import markdown_table
from ..train.config import RunConfig
from ..train.engine import deepspeed_config, initialize_engine, sp_loss_scale
from ..train.model_loader import load_model, model_config
from ..units import MIB
from .attention import PeakMemory

VARIANTS = ("transformers", "seqpar", "+ckpt", "+tiled-mlp", "+tiled-layer", "+offload")


@dataclass
class Variant:
    name: str
    seqpar: bool = True
    gradient_checkpointing: bool = False
    tiled_mlp: int | None = None
    offload_activations: bool = False
    tiled_layer: int | None = None


def variants(names, tile: int) -> list[Variant]:
    """Each named variant; the '+' ones add their feature to all before them."""
    out, ckpt, mlp, layer, offload = [], False, None, None, False
    for name in VARIANTS:
        ckpt = ckpt or name == "+ckpt"
        mlp = tile if (mlp or name == "+tiled-mlp") else None
        layer = tile if (layer or name == "+tiled-layer") else None
        offload = offload or name == "+offload"
        if name in names:
            out.append(Variant(name, seqpar=name != "transformers", gradient_checkpointing=ckpt,
                               tiled_mlp=mlp, offload_activations=offload, tiled_layer=layer))
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
    return cfg


def _train(model_file, variant: Variant, seq_len, zero_json, dtype, steps, seed, mark, config=None):
    """Build, wrap and train `steps` steps on random tokens; `mark(name)` after each phase."""
    cfg = _run_config(model_file, variant, seq_len, zero_json, dtype)
    mesh = init_mesh(torch.distributed.get_world_size() if variant.seqpar else 1)
    config = config or model_config(cfg)
    if not variant.seqpar:
        config._attn_implementation = "sdpa"
    ds = deepspeed_config(cfg, mesh.dp_size, resolve_dtype(dtype) == torch.bfloat16)
    model, hf_ds = load_model(cfg, ds, config)
    if variant.seqpar:
        parallelize(model, mesh, tiled_mlp=variant.tiled_mlp, tiled_layer=variant.tiled_layer,
                    offload_activations=variant.offload_activations)
    if variant.gradient_checkpointing:
        enable_checkpointing(model)
    mark("model built")
    engine = initialize_engine(model, cfg, mesh, ds)
    mark("engine ready")
    scale = sp_loss_scale(ds, mesh.sp_size) if variant.seqpar else 1.0
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=g)
        batch = shard_batch({"input_ids": ids}, mesh) if variant.seqpar else \
            {"input_ids": ids, "labels": ids}
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss * scale)
        engine.step()
        losses.append(float(loss.detach()))
        mark(f"step {len(losses)}")
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
    _train(model_file, variant, 64, zero_json, dtype, 1, seed, lambda name: None, config=config)
    gc.collect()


def _rank_steps(model_file, variant_dict, seq_len, zero_json, dtype, steps, seed):
    """Runs on each rank: prime, then measure `_train` from a baseline."""
    _fixed_malloc()

    variant = Variant(**variant_dict)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    _prime(model_file, variant, zero_json, dtype, seed)
    mem = PeakMemory(device)
    mem.start()  # before the model exists: everything below is counted
    mem.reset_peak()
    phases = {}

    def mark(name):  # memory in use above the baseline now, and the peak so far
        now = mem.result()
        phases[name] = {"now": now["now_bytes"] - mem.baseline, "peak": now["peak_extra_bytes"]}

    t0 = time.perf_counter()
    losses = _train(model_file, variant, seq_len, zero_json, dtype, steps, seed, mark)
    seconds = (time.perf_counter() - t0) / steps
    return {"memory": mem.result(), "phases": phases, "losses": losses, "step_s": seconds}


def run_memory_bench(model_file, seq_lens, *, world_size=2, zero=2, dtype="float32",
                     variant_names=VARIANTS, tile=1024, steps=2, device="cpu", seed=0,
                     timeout=3600.0, out=None, json_path=None) -> list[dict]:
    """Measure every variant at every length, with the planner's prediction beside it.
    Each row is reported (and `json_path` rewritten) as soon as it is measured, so a run
    cut short by a time limit keeps what it measured."""
    zero_json = f"configs/deepspeed/zero{zero}.json"
    rows = []
    chosen = [v for v in variants(variant_names, tile)
              if not (v.name == "+offload" and device == "cpu")]
    for s in seq_lens:
        for v in chosen:
            print(f"[bench memory] {v.name} S={s} W={world_size} ZeRO-{zero}: running...",
                  file=sys.stderr, flush=True)
            cfg = _run_config(model_file, v, s, zero_json, dtype)
            cfg.parallel.sp_size = world_size if v.seqpar else 1
            predicted = plan_for_run(cfg, world_size, config=model_config(cfg), device=device,
                                     plain_transformers=not v.seqpar)
            try:
                r = run_distributed(_rank_steps, world_size, model_file, asdict(v), s, zero_json, dtype,
                                    steps, seed, backend="nccl" if device == "cuda" else "gloo",
                                    timeout=timeout)
                peaks = [x["memory"]["peak_extra_bytes"] for x in r]
                measured, error, step_s, loss = max(peaks), None, r[0]["step_s"], r[0]["losses"][-1]
                phases = r[peaks.index(measured)]["phases"]
            except DistributedRunError as exc:
                measured, error, step_s, loss = None, str(exc).strip().splitlines()[-1], None, None
                phases = None
            rows.append({"variant": v.name, "seq_len": s, "world_size": world_size, "zero": zero,
                         "dtype": dtype, "measured_peak_bytes": measured,
                         "predicted_peak_bytes": predicted.total, "predicted": predicted.as_dict(),
                         "error": error, "step_s": step_s, "loss": loss, "phases": phases})
            result = f"peak {measured / MIB:.0f} MiB, {step_s:.2f} s/step" if measured else error
            print(f"[bench memory] {v.name} S={s}: {result} (plan {predicted.total / MIB:.0f} MiB)",
                  file=sys.stderr, flush=True)
            if json_path:
                write_json(rows, json_path)
    print(format_table(rows), file=out or sys.stdout, flush=True)
    return rows


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


def write_json(rows, path) -> None:
    with open(path, "w") as f:
        json.dump({"rows": rows}, f, indent=1)


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
    p.add_argument("--steps", type=int, default=2, help="training steps per run (the peak is over all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: nccl, one GPU per rank")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    if args.device == "cuda":
        if torch.cuda.device_count() < args.world_size:
            raise SeqparError(f"--device cuda needs {args.world_size} GPUs (one per rank); "
                              f"{torch.cuda.device_count()} visible. Lower --world-size or use --device cpu.")
    if args.world_size < 1 or args.steps < 1:
        raise SeqparError("--world-size and --steps must be at least 1.")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants(names, args.tiled_mlp)  # unknown names fail here, before any process starts
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rows = run_memory_bench(args.model, [int(x) for x in args.seq_len.split(",")], world_size=args.world_size,
                            zero=args.zero, dtype=dtype, variant_names=names, tile=args.tiled_mlp,
                            steps=args.steps, device=args.device, timeout=args.timeout, json_path=args.json)
    return 0 if all(r["error"] is None for r in rows) else 1
