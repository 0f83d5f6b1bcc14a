"""What both evaluations share: evaluation lengths, loading a model directory, running a
model on one rank's shard of a sequence (or the whole sequence without SP), and starting
the ranks of a sequence-parallel evaluation.

`ShardedLM.run(input_ids)` returns this rank's final hidden states (never the
[tokens, vocab] logits: at long lengths they would not fit), the labels shifted on the
full sequence, and the global index of each local token. Perplexity turns them into
per-token losses with `sharded_cross_entropy(..., reduction="none")`; passkey takes the
LM head's argmax at the few positions it needs.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from ..errors import SeqparError
from ..model import hidden_states, parallelize, shard_batch, sharded_cross_entropy
from ..model.batch import prepare_batch
from ..parallel import shard
from ..runtime import in_distributed_job, init_distributed, resolve_dtype
from ..parallel.spawn import DistributedRunError, run_distributed

SPAWN_TIMEOUT_S = 7 * 24 * 3600.0  # an evaluation may legitimately run for hours


def default_device() -> torch.device:
    """The rank's GPU under nccl, the CPU under gloo; outside a job, a GPU if there is one."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_dir, *, dtype: str = "auto", rope: dict | None = None, device=None):
    """A Hugging Face causal LM directory -> model in eval mode on `device`.

    `rope` (optional): keyword arguments of `seqpar.extend_context` (target_len, method,
    factor, rope_theta, original_max_position_embeddings), applied to the config before
    the weights load: evaluate the same weights with another RoPE scaling.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers (heavy), only when a model is loaded

    from ..model.extend import extend_context  # deferred: with transformers

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise SeqparError(f"cannot load a model config from {model_dir} ({exc}); pass --model a Hugging Face "
                          "model directory (e.g. the export of `seqpar train`).") from exc
    if rope:
        rope = dict(rope)
        config = extend_context(config, rope.pop("target_len"), rope.pop("method"), **rope)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=resolve_dtype(dtype))
    return model.to(device or default_device()).eval()


class ShardedLM:
    """A causal LM evaluated on whole sequences (mesh None or SP size 1) or on this rank's
    shard of each sequence (SP size > 1: the model is parallelized once, here).

    With a mesh, sequences are spread over its data-parallel groups (`dp_rank`,
    `dp_size`) and `all_reduce` sums over every rank; without one, nothing is reduced.
    """

    def __init__(self, model, mesh=None, *, attention: str = "ring", layout: str = "zigzag",
                 fused_rope: bool = False):
        model.eval()
        plan = getattr(model, "seqpar_plan", None)
        if plan is not None and mesh is None:
            mesh = plan.mesh
        self.mesh = mesh
        self.sharded = mesh is not None and mesh.sp_size > 1
        if self.sharded and plan is None:
            parallelize(model, mesh, attention=attention, layout=layout, fused_rope=fused_rope)
            plan = model.seqpar_plan
        self.plan = plan
        self.layout = plan.layout if plan is not None else layout
        self.attention = plan.algorithm if plan is not None else attention
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.sp_size = mesh.sp_size if mesh is not None else 1
        self.dp_rank, self.dp_size = (mesh.dp_rank, mesh.dp_size) if mesh is not None else (0, 1)

    @property
    def multiple(self) -> int:
        """Sequence lengths must be a multiple of this (the layout's split)."""
        if not self.sharded:
            return 1
        return 2 * self.sp_size if self.layout == "zigzag" else self.sp_size

    @property
    def is_writer(self) -> bool:
        """The one rank that prints and writes files."""
        return self.mesh is None or not dist.is_initialized() or dist.get_rank() == 0

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor):
        """input_ids [b, S], the same full sequences on every SP rank (plain positions 0..S-1).
        Returns (hidden [b, s, H], labels [b, s] shifted on the full sequence (-100: none),
        index [s]: each local token's position in the full sequence)."""
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len)
        batch = {"input_ids": input_ids.cpu(), "position_ids": positions.expand(input_ids.shape[0], -1)}
        if self.sharded:
            part = shard_batch(batch, self.mesh, layout=self.layout)
            index = shard(positions[None], self.mesh.sp_group, dim=1, layout=self.layout)[0]
        else:
            part, index = prepare_batch(batch), positions
        ids, pos = part["input_ids"].to(self.device), part["position_ids"].to(self.device)
        if self.sharded:
            doc_ids = part.get("doc_ids")
            hidden = hidden_states(self.model, ids, pos, doc_ids.to(self.device) if doc_ids is not None else None)
        else:
            hidden = self.decoder(input_ids=ids, position_ids=pos, use_cache=False)[0]
        return hidden, part["labels"].to(self.device), index.to(self.device)

    @torch.no_grad()
    def token_losses(self, hidden, labels) -> torch.Tensor:
        """float32 per-token NLL of this rank's tokens (0 where the label is -100)."""
        return sharded_cross_entropy(hidden, self.head.weight, labels, None,
                                     bias=getattr(self.head, "bias", None), reduction="none")

    @torch.no_grad()
    def argmax(self, hidden_rows) -> torch.Tensor:
        """Greedy next token for each row of hidden states [n, H]."""
        return self.head(hidden_rows).argmax(-1)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce over every rank of the job (SP shards and DP groups); no-op without a mesh."""
        if self.mesh is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return t
        on_device = t.to(self.device)
        dist.all_reduce(on_device, op=op)
        return on_device.to(t.device)

    def rank0_first(self, build):
        """build() on rank 0, then on the others (they reuse what rank 0 cached on disk)."""
        if self.mesh is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return build()
        if dist.get_rank() == 0:
            out = build()
            dist.barrier()
        else:
            dist.barrier()
            out = build()
        return out


def launch(job, opts: dict, sp_size: int):
    """Run `job(opts)` on the ranks the evaluation needs; return its result.

    Inside a launched job (torchrun, deepspeed, mpirun) every rank runs it and gets the
    (identical, reduced) result. Otherwise, SP size > 1 spawns `sp_size` local ranks
    itself (gloo on the CPU, or nccl when there are that many GPUs) and returns rank 0's
    result; SP size 1 runs in this process. `job` must be a module-level function.
    """
    if in_distributed_job():
        if not dist.is_initialized():
            init_distributed()
        return job(opts)
    if sp_size > 1:

        backend = "nccl" if torch.cuda.device_count() >= sp_size and dist.is_nccl_available() else "gloo"
        try:
            return run_distributed(job, sp_size, opts, backend=backend, timeout=SPAWN_TIMEOUT_S)[0]
        except DistributedRunError as err:
            if "SeqparError" in str(err):  # bad input: show the message, not a wall of tracebacks
                raise SeqparError(str(err).rsplit("SeqparError: ", 1)[-1].splitlines()[0]) from None
            raise
    return job(opts)
