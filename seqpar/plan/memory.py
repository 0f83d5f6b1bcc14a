"""A model of one rank's memory during a training step, term by term.

    from seqpar.plan.memory import ModelShape, RunShape, estimate
    shape = ModelShape.from_config(AutoConfig.from_pretrained(...))
    print(estimate(shape, RunShape(seq_len=131072, world=8, sp_size=8, zero=3)).total)

What is counted (b = bytes per parameter/activation element, 2 for bf16, 4 for fp32;
Psi = parameter count; N = ZeRO partitions = all ranks; t = tokens on this rank):

- parameters: b*Psi, /N under ZeRO-3 (plus the gathered copy of the largest layer and
  the one being prefetched); 0 on the GPU with ZeRO-3 parameter offload.
- gradients: ZeRO-0/1 keep full gradients (b*Psi) during backward; ZeRO-2 reduces them
  through a bucket (`reduce_bucket_size` elements) into a partition; ZeRO-3 allocates its
  bucket (GPU) and a gradient partition in `data_types.grad_accum_dtype` (default: the
  model dtype) once, for the whole run: on the GPU, or in host memory with optimizer
  offload (as deepspeed/runtime/zero/stage3.py places it). On a CPU only the part of a
  bucket that is written counts (RSS), on a GPU all of it.
- optimizer: DeepSpeed's float32 partition per rank: master weights (4) and Adam m and
  v (8) = 12*Psi/N (DeepSpeed's own estimators add the float32 gradient partition to
  this: 16*Psi/N); 0 on the GPU with optimizer offload.
- activations kept for backward: counted per token from what the Llama-family layer
  saves (`saved_per_layer_token`; tests/test_plan.py checks it against the tensors
  autograd actually saves), times layers and t. Gradient checkpointing keeps one
  hidden state per layer; offloaded activations keep none on the GPU.
- transient: the largest short-lived working set on top of those: the loss tile or
  logits, one layer's backward (with checkpointing: its recomputed activations), the
  tiled MLP's tile, the optimizer step's temporary, DeepSpeed's flattening at start-up.
- comm buffers: the K/V blocks in flight in ring attention (and the float32 dK/dV),
  Ulysses' all-to-all buffers. Long shards run the ring in passes over groups of K/V
  heads, which divides its buffers and accumulators by the number of passes.

The peak is taken as the largest of three moments (start-up, end of forward/start of
backward, optimizer step); `bench memory` compares it with measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ..errors import SeqparError
from ..parallel.volume import auto_kv_heads_per_pass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed defaults when its JSON does not set them (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
LOSS_CHUNK_LOGITS_BYTES = 256 << 20  # seqpar.model.loss.CHUNK_LOGITS_BYTES


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter, counted on the meta device
    largest_layer_params: int  # the biggest module ZeRO-3 gathers at once
    layer_params: int = 0  # one decoder layer
    head_params: int = 0  # the LM head (its gradient comes first in backward)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        import torch  # deferred: torch, only to count parameters (plan is arithmetic)
        from transformers import AutoModelForCausalLM  # deferred: transformers (heavy), only to count parameters

        with torch.device("meta"):  # exact counts without allocating anything
            model = AutoModelForCausalLM.from_config(config)
        layers = model.get_decoder().layers
        per_module = [sum(p.numel() for p in layers[0].parameters()),
                      model.get_input_embeddings().weight.numel(),
                      model.get_output_embeddings().weight.numel()]
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size, params=sum(p.numel() for p in model.parameters()),
                   largest_layer_params=max(per_module), layer_params=per_module[0],
                   head_params=per_module[2])


@dataclass
class RunShape:
    seq_len: int
    world: int = 1  # ranks (GPUs) in the run
    sp_size: int = 1
    ulysses_size: int = 1
    attention: str = "ring"  # ring | ulysses | hybrid
    zero: int = 2
    dtype: str = "bfloat16"
    micro_batch: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    tiled_mlp: int | None = None
    tiled_layer: int | None = None  # every token-wise part of a layer in tiles (seqpar.model.tiled_layer)
    head_groups: int = 1  # the tiled layer's attention in groups of heads, one at a time
    offload_activations: bool = False
    tiled_loss: bool = True
    loss_chunk: int | None = None  # tokens per chunk of the tiled loss (None: 256 MiB of float32 logits)
    plain_transformers: bool = False  # transformers' own attention and loss, no seqpar
    grad_accum_dtype: str | None = None  # DeepSpeed data_types.grad_accum_dtype (None: the model's)
    reduce_bucket: int = DS_REDUCE_BUCKET
    prefetch_bucket: int = DS_PREFETCH_BUCKET
    device: str = "cuda"  # cpu: buffers count only where they are written (RSS)


@dataclass
class MemoryEstimate:
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0
    comm_buffers: int = 0
    cpu_offloaded: int = 0  # host memory per rank taken by offloads (not in total)
    peak_moment: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.transient + self.comm_buffers

    def as_dict(self) -> dict:
        return {**asdict(self), "states": self.states, "total": self.total}


def saved_per_layer_token(shape: ModelShape, b: int, *, tiled_mlp: bool = False,
                          tiled_layer: bool = False, head_groups: int = 1) -> int:
    """Bytes one decoder layer keeps for backward per token (no checkpointing).

    RMSNorm (x2): the float32 upcast of its input, the normalised value and its output in
    the model dtype (4 + 2b per hidden unit; with fp32 the upcast is the input itself),
    and a float32 rsqrt. Attention: rotated q and k, v and the output, and a float32
    log-sum-exp per head (seqpar's op and transformers' SDPA path alike: SDPA's GQA
    expansion is a view). MLP: gate, up, act(gate), act*up; none with the tiled MLP.
    The tiled layer keeps only its input (the tiles' checkpoints) and attention's tensors;
    in head groups, its input and the residual after attention (all the recomputed layer
    keeps when the layer is not checkpointed).
    """
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = b * (2 * q + 2 * kv) + 4 * shape.heads
    if tiled_layer and head_groups > 1:
        return 2 * b * h
    if tiled_layer:
        return b * h + attention
    norms = 2 * ((4 + 2 * b) * h + 4)
    mlp = 0 if tiled_mlp else 4 * shape.intermediate * b
    return norms + attention + mlp


def _states(shape: ModelShape, run: RunShape, b: int) -> dict:
    """Parameters and optimizer states (alive all the time) and gradients: at the start of
    backward (the LM head's and the last layer's) and at its end (all of them)."""
    psi, n = shape.params, run.world
    first = shape.head_params + shape.layer_params  # gradients made by the first layer backward
    out = {"parameters": b * psi, "optimizer": 12 * psi // n, "cpu": 0,
           "grads_early": b * first, "grads_full": b * psi}
    if run.zero == 0:
        out["optimizer"] = (8 if b == 4 else 16) * psi  # Adam m, v (+ fp32 master and grads)
    # A CPU's RSS holds only the part of a bucket that has been written; a GPU all of it.
    cpu = run.device == "cpu"
    if run.zero == 2:  # reduced through the bucket into this rank's partition
        out["grads_early"] = b * (psi // n + (min(run.reduce_bucket, first) if cpu else run.reduce_bucket))
        out["grads_full"] = b * (psi // n + (min(run.reduce_bucket, psi) if cpu else run.reduce_bucket))
    if run.zero == 3:
        # deepspeed/runtime/zero/stage3.py: the reduce bucket (`ipg_buckets`, reduce_bucket_size
        # elements of the model dtype) is always on the GPU; the gradient partition
        # (`grad_partitions_flat_buffer`, psi/N elements of data_types.grad_accum_dtype, the
        # model dtype by default) lives on `self.device`: the GPU, or pinned host memory
        # with offload_optimizer, which then also keeps the float32 gradients the CPU Adam
        # reads (`fp32_partitioned_groups_flat[i].grad`) on the host.
        g = DTYPE_BYTES[run.grad_accum_dtype] if run.grad_accum_dtype else b
        bucket = b * (min(run.reduce_bucket, psi) if cpu else run.reduce_bucket)
        partition = g * psi // n
        out["grads_early"] = out["grads_full"] = bucket + (0 if run.offload_optimizer else partition)
        if run.offload_optimizer:
            out["cpu"] += partition
        live = 2 * shape.largest_layer_params  # the gathered layer and the prefetched next one
        out["parameters"] = b * (psi // n + live)
        if run.offload_params:
            out["cpu"] += b * psi // n
            out["parameters"] = b * live
    if run.offload_optimizer:
        out["cpu"] += out["optimizer"] + 4 * psi // n
        out["optimizer"] = 0
    return out


def _activations(shape: ModelShape, run: RunShape, b: int, t: int) -> dict:
    plain, h, v = run.plain_transformers, shape.hidden, shape.vocab
    tiled_layer = _layer_tiled(run, t)
    tiled = not tiled_layer and bool(run.tiled_mlp) and not plain and t > run.tiled_mlp
    groups = run.head_groups if tiled_layer else 1
    layer = saved_per_layer_token(shape, b, tiled_mlp=tiled, tiled_layer=tiled_layer, head_groups=groups)
    per_layer = b * h if run.gradient_checkpointing else layer
    # RoPE's cos/sin at full length: saved by the layers, or (with checkpointing) inputs of
    # the tiled layer's checkpoints (measured; transformers' checkpointed layers also keep
    # them in the recompute's closure: not counted there, within the measured error).
    rope_tables = 0 if run.gradient_checkpointing and not tiled_layer else 2 * shape.head_dim * b
    # Tiled: its input, and its output kept by the loss (`recomputed_layer.tile_tokenwise`).
    final_norm = 2 * b * h if tiled_layer else (4 + 2 * b) * h
    loss_saved = 4 * v if plain or not run.tiled_loss else 0  # log-softmax output
    saved = t * (shape.layers * per_layer + rope_tables + final_norm + loss_saved + 32)
    head = t * (final_norm + loss_saved)  # the final norm's and the loss's: freed by their backward
    back_on_device = run.offload_activations and run.device != "cpu"
    if back_on_device:
        # save_on_cpu: what the loss saves stays; with the tiled layer the loss's input
        # (the final norm's output) comes back for the loss's backward.
        saved = head = t * ((b * h if tiled_layer else final_norm) + loss_saved)
    # The largest short-lived working set at the end of forward / during backward.
    if plain or not run.tiled_loss:
        loss = t * v * (b + 4 + (4 if b != 4 else 0))  # logits, fp32 grad, fp32 upcast
    else:
        chunk = min(t, run.loss_chunk or max(1, LOSS_CHUNK_LOGITS_BYTES // (4 * v)))
        loss = chunk * v * (4 + b) + 4 * v * h + 4 * t  # chunk logits (+ cast), fp32 dW, lse
        loss += b * t * h  # the hidden states' gradient, filled chunk by chunk in backward
    # With checkpointing one layer's activations are recomputed for its backward; with
    # offloading they are brought back from CPU memory one layer at a time. The tiled
    # layer recomputes q, k, v, the attention output and its LSE (its input is the
    # checkpoint, already counted in `saved` unless it was offloaded).
    recompute = t * layer if run.gradient_checkpointing or back_on_device else 0
    if run.gradient_checkpointing and not back_on_device and (tiled_layer or b == 4):
        # The layer's input is the checkpoint: the tiled layer keeps nothing else of it,
        # and in float32 the first norm's upcast is that same tensor.
        recompute = t * (layer - b * h)
    q = shape.heads * shape.head_dim
    attention_grads = _attention_grads(shape, run, b, t)
    out = {"saved": saved, "saved_in_backward": saved - head, "loss": loss, "layer": t * layer,
           "recompute": recompute, "attention_grads": attention_grads}
    if tiled_layer:
        return {**out, **_tiled_layer_backward(shape, run, b, t, groups)}
    # Gradients in flight in one layer's backward. The MLP's part comes first: the
    # layer output's and the MLP input's gradients, float32 in the norm (two; one in a
    # float32 model, whose upcast is the gradient itself: measured on CPU ranks), two of the
    # intermediate width in the MLP's (act * up) backward (with the tiled MLP, per tile,
    # on top of the tile's recomputed gate/up/act/product). Attention's part comes after
    # the MLP's and the post-attention norm's, whose saved tensors are freed by then: the
    # residual's gradient and attention output's beside dq/dk/dv. (Measured on CPU ranks,
    # bench_layer, and on an H200, 1B shape: README "Memory".)
    widest = (4 + 2) * shape.intermediate * run.tiled_mlp if tiled else 2 * shape.intermediate * t
    post_norm_and_mlp = (4 + 2 * b) * h + 4 + (0 if tiled else 4 * shape.intermediate * b)
    out.update(norm_grads=t * 4 * (1 if b == 4 else 2) * h + b * t * 2 * h, mlp_grads=b * widest,
               attention_phase=attention_grads + b * t * (h + q) - t * post_norm_and_mlp)
    return out


def _tiled_layer_backward(shape: ModelShape, run: RunShape, b: int, t: int, groups: int) -> dict:
    """The tiled layer's backward terms.

    Gradients at full length: dx (accumulating), d_out (gathered from the tiles for
    attention's backward), and either dy while the last o_proj/MLP tiles run backward or
    dq/dk/dv in attention's backward. One tile's working set: the recomputed o_proj
    output, residual, norm (float32) and gate/up/act/product, and their gradients. Each
    weight is used once per tile: autograd sums the tiles' weight gradients in a buffer
    while the next tile's arrives (two copies of the layer's, measured).

    In head groups (`seqpar/model/recomputed_layer.py`): stage 3's backward holds the
    recomputed h and dy, which becomes dh in place; then each group's backward holds dh,
    the layer input's gradient buffer and one group's recomputed q, k, v, out, dout and
    dq, dk, dv; o_proj runs per tile (measured, CPU ranks, bench_layer and bench_gqa:
    README "Memory").
    """
    h, q = shape.hidden, shape.heads * shape.head_dim
    terms = {"tiled_layer": True, "grads_full": b * t * (h + q) + 2 * b * shape.layer_params, "dy": b * t * h,
             "tile_work": run.tiled_layer * (b * (6 * shape.intermediate + 4 * h) + 4 * 2 * h)}
    if groups > 1:
        group = _attention_shape(shape, run, t)
        group_saved = t * (saved_per_layer_token(group, b, tiled_layer=True) - b * h)
        terms.update(head_groups=groups, layer=b * t * h, recompute=0, dy=0,
                     grads_full=2 * b * t * h + 2 * b * shape.layer_params,
                     attention_grads=group_saved + b * t * group.heads * group.head_dim
                     + _attention_grads(group, run, b, t))
    return terms


def _attention_grads(shape: ModelShape, run: RunShape, b: int, t: int) -> int:
    """Attention's backward beside what it saved: the kernels' dq/dk/dv and, per pass of
    the ring, its float32 dq, the GQA calls' temporaries and the pass's own copies."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    passes = _ring_passes(shape, run, t)
    grads = b * t * (q + 2 * kv) + t * _gqa_calls(shape, run, b) // passes
    if run.attention in ("ring", "hybrid"):
        grads += t * _ring_accumulators(shape, run, b) // passes
    if passes > 1:  # a pass's contiguous q, out, dout, k, v and its dq, dk, dv before they are placed
        grads += t * b * (4 * q + 4 * kv) // passes
    return grads


def _layer_tiled(run: RunShape, t: int) -> bool:
    """Whether the tiled layer tiles a shard of t tokens (a shorter one runs the plain layer)."""
    return bool(run.tiled_layer) and not run.plain_transformers and t > run.tiled_layer


def _attention_shape(shape: ModelShape, run: RunShape, t: int) -> ModelShape:
    """The heads one attention call sees: all of them, or one head group's (a part of
    one K/V head's query heads has that K/V head)."""
    groups = run.head_groups if _layer_tiled(run, t) else 1
    if groups == 1:
        return shape
    return replace(shape, heads=shape.heads // groups, kv_heads=max(shape.kv_heads // groups, 1))


def _ring_passes(shape: ModelShape, run: RunShape, t: int) -> int:
    """Passes ring attention makes over groups of K/V heads on a shard of t tokens
    (`seqpar.parallel.volume.auto_kv_heads_per_pass`); 1 where no ring exchanges. Each pass
    holds the float32 accumulators, ring buffers and kernel temporaries of its heads only."""
    ring = run.sp_size // run.ulysses_size if run.attention == "hybrid" else run.sp_size
    if run.plain_transformers or run.attention == "ulysses" or ring <= 1:
        return 1
    u = run.ulysses_size if run.attention == "hybrid" else 1
    kv_heads = max(shape.kv_heads // u, 1)  # Ulysses copies K/V heads when it has fewer than U
    per_pass = auto_kv_heads_per_pass(1, t * u, shape.heads // u, kv_heads, shape.head_dim)
    return kv_heads // per_pass


def _ring_accumulators(shape: ModelShape, run: RunShape, b: int) -> int:
    """Bytes per token that ring attention's backward (seqpar/parallel/ring.py) holds beside
    the kernels' dq/dk/dv: dq accumulated in float32 (at least; its float32 dK/dV travel
    in the buffers `_comm` counts). A ring of one rank runs one block of attention, with
    none. Measured on an H200 in bfloat16 (allocator trace of the tiled layer's backward,
    README); in float32 they are the model dtype. Counted for the tiled layer, whose
    backward peak is attention's; the untiled layers' terms over-predict by more already."""
    exchanging = run.sp_size // run.ulysses_size > 1
    return max(b, 4) * shape.heads * shape.head_dim if exchanging else 0


def _gqa_calls(shape: ModelShape, run: RunShape, b: int) -> int:
    """Bytes per token that GQA costs inside attention's backward on PyTorch's fused CUDA
    ops (cuDNN, flash, efficient: declared without native GQA in
    `seqpar/ops/library_kernels.py`; the CPU flash op and flash-attn take grouped heads).
    The glue calls the op once per offset in a query-head group, on the unexpanded K/V:
    during a call, contiguous copies of that 1/g of q, out and dout and the op's dq for
    them (4 x b x kv, as q/g = kv) and dK/dV summed in float32 (the call's own dK/dV
    stand in for the model-dtype ones the kernels' term counts, made after the last
    call). (Before, K/V expanded to the query heads and their gradients: 4 x b x q,
    measured on an H200 as the tiled layer's per-token slope, 110.8 KiB per token
    measured, 108 predicted, 1B shape.)"""
    if run.device != "cuda" or shape.kv_heads == shape.heads:
        return 0
    return (4 * b + 2 * 4) * shape.kv_heads * shape.head_dim


def _layer_backward(acts: dict, comm: int) -> dict:
    """One layer's backward on top of what it recomputed: the largest of its moments."""
    if acts.get("tiled_layer"):
        attention = acts["grads_full"] + acts["attention_grads"]
        if attention + comm >= acts["dy"] + acts["tile_work"]:
            return {"transient": attention, "comm_buffers": comm}
        return {"transient": acts["grads_full"] + acts["dy"] + acts["tile_work"]}
    # The larger of the MLP's part (its norm's float32 gradients, the MLP's) and
    # attention's (with the comm buffers, which exist only inside it).
    mlp = acts["norm_grads"] + acts["mlp_grads"]
    if acts["attention_phase"] + comm >= mlp:
        return {"transient": acts["attention_phase"], "comm_buffers": comm}
    return {"transient": mlp}


def _comm(shape: ModelShape, run: RunShape, b: int, t: int) -> int:
    if run.plain_transformers or run.sp_size == 1:
        return 0
    kv = shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    ring = run.sp_size // run.ulysses_size
    total = 0
    if run.attention in ("ulysses", "hybrid"):
        total += 2 * t * (q + 2 * kv) * b  # all-to-all send and receive of q, k, v
    if run.attention in ("ring", "hybrid") and ring > 1:
        # K/V blocks: the one in use and the one arriving (after Ulysses' all-to-all a
        # rank holds U x t tokens of kv/U heads: the same bytes); backward adds the float32
        # dK/dV travelling with them.
        total += (2 * 2 * t * kv * b + 2 * 2 * t * kv * 4) // _ring_passes(shape, run, t)
    return total


def estimate(shape: ModelShape, run: RunShape) -> MemoryEstimate:
    b = DTYPE_BYTES[run.dtype]
    sp = 1 if run.plain_transformers else run.sp_size
    t = run.micro_batch * run.seq_len // sp
    states = _states(shape, run, b)
    acts = _activations(shape, run, b, t)
    comm = _comm(_attention_shape(shape, run, t), run, b, t)
    layer_back = _layer_backward(acts, comm)
    # ZeRO-3 keeps its gradient buffers for the whole run; the others fill them in backward.
    always = {"gradients": states["grads_full"]} if run.zero == 3 else {}
    # Parameters and optimizer states are always there; the peak adds the largest of:
    moments = {
        # the loss: every activation saved, the loss's logits (or one tile of them)
        "loss": {**always, "activations": acts["saved"], "transient": acts["loss"]},
        # the last layer's backward: every activation but the final norm's and the loss's
        # (their backward ran), that layer's recomputed or brought back, the first gradients
        "last layer backward": {**layer_back, "activations": acts["saved_in_backward"],
                                "gradients": states["grads_early"],
                                "transient": layer_back["transient"] + acts["recompute"]},
        # the first layer's backward: all gradients, that layer's activations
        "first layer backward": {**layer_back, "gradients": states["grads_full"],
                                 "transient": layer_back["transient"] + acts["layer"]},
        # Adam's step: the float32 gradient partition (ZeRO-3: already in `always`) and one
        # temporary of its size
        "optimizer step": {**always, "transient": 0 if run.offload_optimizer else
                           (4 if run.zero == 3 else 8) * shape.params // run.world},
        # ZeRO-1/2 flatten the model's parameters into one buffer at start-up
        "start-up": {**always, "transient": b * shape.params if run.zero in (1, 2) else 0},
    }
    peak = max(moments, key=lambda m: sum(moments[m].values()))
    est = MemoryEstimate(parameters=states["parameters"], optimizer=states["optimizer"],
                         cpu_offloaded=states["cpu"], peak_moment=peak, **moments[peak])
    est.detail = {"tokens_per_rank": t, "gradients_early": states["grads_early"],
                  "gradients_full": states["grads_full"],
                  "moments": {m: sum(v.values()) for m, v in moments.items()},
                  **{f"act_{k}": v for k, v in acts.items() if k != "tiled_layer"}}
    return est


def load_deepspeed_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SeqparError(f"DeepSpeed config {path!r} not found; set train.deepspeed_config to one of "
                          f"configs/deepspeed/zero{{1,2,3}}.json.") from None
    except json.JSONDecodeError as err:
        raise SeqparError(f"DeepSpeed config {path!r} is not valid JSON: {err}") from None


def plan_for_run(cfg, world: int, *, config, device: str = "cuda",
                 plain_transformers: bool = False) -> MemoryEstimate:
    """The estimate for a seqpar run config (a `RunConfig`, read by attribute: plan does not
    import train) on `world` ranks; `config` is the model's transformers config (the caller
    builds it, e.g. with `seqpar.train.model_loader.model_config`)."""
    return estimate(ModelShape.from_config(config),
                    run_shape(cfg, world, device=device, plain_transformers=plain_transformers))


def run_shape(cfg, world: int, *, device: str = "cuda", plain_transformers: bool = False) -> RunShape:
    """The `RunShape` of a seqpar run config on `world` ranks (see `plan_for_run`)."""
    ds = load_deepspeed_config(cfg.train.deepspeed_config)
    zero = ds.get("zero_optimization", {})
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return RunShape(
        seq_len=cfg.train.seq_len, world=world, sp_size=cfg.parallel.sp_size,
        ulysses_size=cfg.parallel.ulysses_size, attention=cfg.parallel.attention,
        zero=int(zero.get("stage", 0)), dtype=dtype, micro_batch=cfg.train.micro_batch_size,
        offload_optimizer=_offloads(zero.get("offload_optimizer")),
        offload_params=_offloads(zero.get("offload_param")),
        gradient_checkpointing=cfg.model.gradient_checkpointing, tiled_mlp=cfg.parallel.tiled_mlp,
        tiled_layer=cfg.parallel.tiled_layer, head_groups=cfg.parallel.head_groups,
        grad_accum_dtype=_grad_accum_dtype(ds), offload_activations=cfg.parallel.offload_activations,
        tiled_loss=cfg.parallel.tiled_loss, loss_chunk=cfg.parallel.loss_chunk,
        plain_transformers=plain_transformers,
        reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)), device=device)


def _grad_accum_dtype(ds: dict) -> str | None:
    name = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def _offloads(section) -> bool:
    return bool(section) and section.get("device", "none") not in (None, "none")
