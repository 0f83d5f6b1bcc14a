"""Sequence-tiled decoder layer: everything token-wise runs over token tiles.

A pre-norm decoder layer (Llama, Qwen2, Qwen3, Mistral) is

    y = h + mlp(post_norm(h)),   h = x + o_proj(attention(rope(q/k/v_proj(input_norm(x)))))

and only `attention` mixes tokens. The tiled layer runs it in three stages:

1. per tile of T tokens, recomputed in backward (a checkpoint per tile): input RMSNorm,
   q/k/v projections, q/k norms (Qwen3) and RoPE - the model's own attention module runs
   on the tile, and seqpar's attention function hands back the rotated q, k, v instead of
   attending (`seqpar_capture`; o_proj is skipped for that call);
2. attention on the whole shard's q, k, v (ring / Ulysses / hybrid), with exactly the
   arguments the module passed;
3. per tile, recomputed in backward: o_proj, the residual add, post-attention RMSNorm, the
   MLP and the second residual add.

So only q, k, v, the attention output and their gradients exist at full shard length;
the float32 copies RMSNorm makes, the MLP's [tokens, intermediate] tensors and the
normalised hidden states exist for one tile at a time. Same numbers as the plain layer:
every token-wise op sees the same inputs, only in smaller batches.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import SeqparError
from .tiled_mlp import tile_module

_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class _Capture:
    """Stands in for attention on one tile: keeps what the module passed, returns a
    placeholder that the o_proj pre-hook below drops (no o_proj work on it)."""

    def __init__(self):
        self.qkv = None
        self.call = None

    def __call__(self, query, key, value, attention_mask, **kwargs):
        self.qkv = tuple(t.transpose(1, 2) for t in (query, key, value))  # bhsd -> bshd
        self.call = (attention_mask, kwargs)
        b, h, s, d = query.shape
        return query.new_empty(b, s, h, d), None


def _skip_when_capturing(attn):
    def hook(module, args):
        if getattr(attn, "seqpar_capture", None) is not None:
            return (args[0][..., :0, :],)  # no tokens: the placeholder is never projected
        return None

    return hook


def _check_layer(layer) -> None:
    missing = [p for p in _PARTS if not hasattr(layer, p)]
    if missing or not hasattr(getattr(layer, "self_attn", None), "o_proj"):
        raise SeqparError(f"parallel.tiled_layer needs a pre-norm decoder layer with {', '.join(_PARTS)} "
                          f"and self_attn.o_proj (Llama, Qwen2, Qwen3, Mistral); "
                          f"{type(layer).__name__} lacks {', '.join(missing) or 'self_attn.o_proj'}. "
                          f"Use parallel.tiled_mlp instead.")


def _tiled_layer(layer, plain_forward, tile_tokens: int):
    attn = layer.self_attn
    attn.o_proj.register_forward_pre_hook(_skip_when_capturing(attn))

    def project(x, cos, sin, kwargs):
        """Stage 1 on one tile: (q, k, v) in bshd, and how attention was called."""
        capture = _Capture()
        attn.seqpar_capture = capture
        try:
            attn(layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=None, **kwargs)
        finally:
            attn.seqpar_capture = None
        project.call = capture.call
        return capture.qkv

    def finish(x, out):
        """Stage 3 on one tile: o_proj + residual, post-attention norm, MLP + residual."""
        h = x + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def run(fn, *args):
        if torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def tiled(hidden_states, position_embeddings, kwargs):
        cos, sin = position_embeddings
        xs = hidden_states.split(tile_tokens, dim=1)
        bounds = [0]
        for x in xs:
            bounds.append(bounds[-1] + x.shape[1])
        qkv = [run(partial(project, kwargs=kwargs), x, cos[:, a:e], sin[:, a:e])
               for x, a, e in zip(xs, bounds, bounds[1:])]
        q, k, v = (torch.cat(parts, dim=1) for parts in zip(*qkv))
        del qkv
        mask, call = project.call
        attention = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
        out, _ = attention(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, **call)
        del q, k, v
        outs = out.reshape(*out.shape[:2], -1).split(tile_tokens, dim=1)
        return torch.cat([run(finish, x, o) for x, o in zip(xs, outs)], dim=1)

    def forward(hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_embeddings = kwargs.get("position_embeddings")
        if (args or cache is not None or position_embeddings is None or kwargs.get("attention_mask") is not None
                or hidden_states.shape[1] <= tile_tokens):
            return plain_forward(hidden_states, *args, **kwargs)
        # Tensors of the whole sequence or per-token bookkeeping stay with the plain call only.
        for name in ("attention_mask", "position_ids", "position_embeddings", "cache", "past_key_values",
                     "use_cache", "cache_position"):
            kwargs.pop(name, None)
        go = partial(tiled, position_embeddings=position_embeddings, kwargs=kwargs)
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(go, hidden_states)  # as GradientCheckpointingLayer does
        return go(hidden_states)

    forward.seqpar_tiled = True
    return forward


def use_tiled_layer(model, tile_tokens: int = 8192) -> int:
    """Tile every decoder layer of `model` (and its final norm) by `tile_tokens` tokens;
    returns how many layers were tiled. Raises SeqparError for layers of another shape."""
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    for layer in layers:
        _check_layer(layer)
    count = 0
    for layer in layers:
        if getattr(layer.forward, "seqpar_tiled", False):
            continue
        layer.forward = _tiled_layer(layer, layer.forward, tile_tokens)
        count += 1
    norm = getattr(decoder, "norm", None)
    if norm is not None:
        tile_module(norm, tile_tokens)
    return count
