"""`parallelize`: switch a Hugging Face causal LM to sequence-parallel training in place.

Nothing of the modeling code is copied. We (1) register the seqpar attention function
with transformers' AttentionInterface and select it, (2) optionally route the model's
rotary embedding through the fused `seqpar.ops.apply_rope` (and make dynamic NTK
rope scale by the global sequence length), and (3) wrap `forward` so
that it passes the parallel plan and document ids down to attention and computes the
loss sharded over the SP group (tiled, so [seq, vocab] logits never exist at once).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import SeqparError
from ..parallel import ALGORITHMS, LAYOUTS
from .attention import (
    ATTN_IMPLEMENTATION,
    SeqParallelPlan,
    check_model_heads,
    register_attention,
    ulysses_size,
)
from .dynamic_rope import use_global_dynamic_rope
from .loss import sharded_cross_entropy
from .rope import use_fused_rope
from .tiled_layer import use_tiled_layer
from .tiled_mlp import use_tiled_mlp

# Config fields that rescale logits after the LM head; the sharded loss does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_supported(model, algorithm: str, layout: str) -> None:
    if algorithm not in ALGORITHMS:
        raise SeqparError(f"unknown attention={algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
    if layout not in LAYOUTS:
        raise SeqparError(f"unknown layout={layout!r}; choose one of {', '.join(LAYOUTS)}.")
    config = model.config
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise SeqparError(f"{type(model).__name__} transforms its logits ({name}="
                              f"{getattr(config, name)}), which seqpar's sharded loss does not support yet.")
    if model.get_output_embeddings() is None or not hasattr(model, "get_decoder"):
        raise SeqparError(f"{type(model).__name__} is not a causal LM with an LM head; pass an "
                          f"AutoModelForCausalLM model.")


def parallelize(model, mesh, *, attention: str = "ring", layout: str = "zigzag",
                fused_rope: bool = True, tiled_loss: bool = True, tiled_mlp: int | None = None,
                offload_activations: bool = False, tiled_layer: int | None = None,
                head_groups: int = 1, loss_chunk: int | None = None):
    """Make `model` (any RoPE causal LM of transformers) run sequence-parallel over `mesh`.

    Afterwards, on every SP rank, `model(**seqpar.model.shard_batch(batch, mesh,
    layout=layout)).loss` is the mean token loss of the unsharded batch, and the sum of
    parameter gradients over the SP group is the unsharded gradient. Returns `model`.

    `tiled_mlp=N` runs each layer's MLP in tiles of N tokens, recomputed in backward
    (same numbers, less activation memory). `tiled_layer=N` runs every token-wise part of
    each decoder layer (norms, q/k/v/o projections with RoPE, residual adds, MLP) and the
    final norm in tiles of N tokens, recomputed in backward; only attention's q, k, v and
    output exist at full shard length (it includes the tiled MLP); `head_groups=G` runs its
    attention in G groups of heads, one at a time, at the cost of one more attention
    forward per layer (see `seqpar.model.tiled_layer`). `loss_chunk=N`: the tiled loss's
    chunk in tokens (default: 256 MiB of float32 logits). `offload_activations=True` keeps the tensors
    saved for backward in (pinned) CPU memory; with gradient checkpointing on, those are
    just the layers' input hidden states.
    """
    _check_supported(model, attention, layout)
    plan = SeqParallelPlan(mesh=mesh, algorithm=attention, layout=layout)
    check_model_heads(model.config, plan)
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if fused_rope:
        use_fused_rope(model)
    use_global_dynamic_rope(model, mesh.sp_group)  # dynamic NTK: scale by the whole sequence's length
    if head_groups != 1 and not tiled_layer:
        raise SeqparError("head_groups needs the tiled layer: set tiled_layer (parallel.tiled_layer) too.")
    if tiled_layer:
        use_tiled_layer(model, tiled_layer, head_groups, ulysses_size(plan))
    elif tiled_mlp:
        use_tiled_mlp(model, tiled_mlp)
    model.seqpar_plan = plan
    model.forward = _sharded_forward(model, plan, tiled_loss, offload_activations, loss_chunk)
    return model


def enable_checkpointing(model) -> None:
    """Per-layer activation checkpointing (non-reentrant: it works with ZeRO-3 hooks and
    inputs that need no grad). transformers >= 5.2x names it activation_checkpointing_enable."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hidden_states(model, input_ids, position_ids, doc_ids=None, **kwargs):
    """This rank's final hidden states [b, s, H] from a parallelized model (no LM head),
    for inputs made by `shard_batch`; e.g. for evaluation that needs more than the loss."""
    return model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               seqpar_plan=model.seqpar_plan, seqpar_doc_ids=doc_ids, **kwargs)[0]


def _sharded_forward(model, plan: SeqParallelPlan, tiled_loss: bool, offload_activations: bool = False,
                     loss_chunk: int | None = None):
    head = model.get_output_embeddings()

    def forward(input_ids=None, labels=None, position_ids=None, doc_ids=None, attention_mask=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if position_ids is None:
            raise SeqparError("a parallelized model needs global position_ids; build its inputs "
                              "with seqpar.model.shard_batch(batch, mesh).")
        if attention_mask is not None:
            raise SeqparError("pass padding to seqpar.model.shard_batch (it turns attention_mask "
                              "into document ids and ignored labels), not to the model.")
        kwargs.pop("num_items_in_batch", None)  # the sharded loss counts tokens itself
        saved = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
                 if offload_activations else contextlib.nullcontext())
        with saved:
            return _run(input_ids, labels, position_ids, doc_ids, inputs_embeds, kwargs)

    def _run(input_ids, labels, position_ids, doc_ids, inputs_embeds, kwargs):
        hidden = hidden_states(model, input_ids, position_ids, doc_ids, inputs_embeds=inputs_embeds, **kwargs)
        if labels is None:
            return CausalLMOutputWithPast(logits=head(hidden))
        return CausalLMOutputWithPast(loss=head(hidden, seqpar_labels=labels))

    _make_loss_head(head, plan, tiled_loss, loss_chunk)
    return forward


def _make_loss_head(head, plan: SeqParallelPlan, tiled_loss: bool, loss_chunk: int | None = None) -> None:
    """Let the LM head itself compute the sharded loss when given labels.

    The loss must run inside the head module's own forward: DeepSpeed ZeRO-3 gathers a
    module's partitioned weight only around that module's forward and backward.
    """
    plain_forward = head.forward

    def forward(hidden, seqpar_labels=None):
        if seqpar_labels is None:
            return plain_forward(hidden)
        return sharded_cross_entropy(hidden, head.weight, seqpar_labels, plan.mesh.sp_group,
                                     bias=head.bias, tiled=tiled_loss, chunk_size=loss_chunk)

    head.forward = forward
