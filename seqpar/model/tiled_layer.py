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

Long shards go further, in head groups (`seqpar.parallel.head_groups`): stages 1-2 and
o_proj run once per group of heads, so only one group's q, k, v, output and gradients
exist at a time; o_proj's parts are added into the residual tile by tile
(o_proj(out) = sum over groups of out_g @ W_o[:, g]^T), then stage 3 finishes per tile.
The q/k/v/o projections compute only the group's rows (columns) of their weights, inside
the modules' own calls. The grouped layer is one autograd Function that keeps only its
input and recomputes everything in backward with one full-length gradient buffer per
block (`recomputed_layer.py`). The price: attention's forward runs once more per layer
(h is recomputed before each group's own recompute), so groups are off unless asked for
(`head_groups`).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import SeqparError
from ..parallel.head_groups import check_head_groups, head_groups
from .recomputed_layer import recomputed_layer, tile_tokenwise

_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class _Capture:
    """Stands in for attention on one tile: keeps what the module passed, returns a
    placeholder that o_proj skips (`_part_forward`)."""

    def __init__(self):
        self.qkv = None
        self.call = None

    def __call__(self, query, key, value, attention_mask, **kwargs):
        self.qkv = tuple(t.transpose(1, 2) for t in (query, key, value))  # bhsd -> bshd
        self.call = (attention_mask, kwargs)
        b, h, s, d = query.shape
        return query.new_empty(b, s, h, d), None


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _part_forward(linear, plain_forward, attn):
    """`linear`'s forward, able to compute only a head group's part: output rows (q/k/v)
    or input columns (o_proj; its bias added by the first group only). o_proj does no work
    on the placeholder a captured tile hands it."""
    def forward(x):
        if linear is attn.o_proj and getattr(attn, "seqpar_capture", None) is not None:
            return x.new_empty(*x.shape[:-1], 0)
        part = getattr(linear, "seqpar_part", None)
        if part is None:
            return plain_forward(x)
        rows, cols, with_bias = part
        weight = linear.weight[rows] if rows is not None else linear.weight[:, cols]
        bias = linear.bias if with_bias else None
        if bias is not None and rows is not None:
            bias = bias[rows]
        return F.linear(x, weight, bias)

    return forward


@contextmanager
def _group_parts(attn, group):
    """q/k/v_proj and o_proj compute only `group`'s heads (None: all of them)."""
    if group is None:
        yield
        return
    d = attn.head_dim
    q = slice(group.q_heads.start * d, group.q_heads.stop * d)
    kv = slice(group.kv_heads.start * d, group.kv_heads.stop * d)
    parts = {"q_proj": (q, None, True), "k_proj": (kv, None, True), "v_proj": (kv, None, True),
             "o_proj": (None, q, group.index == 0)}
    for name, part in parts.items():
        getattr(attn, name).seqpar_part = part
    try:
        yield
    finally:
        for name in parts:
            getattr(attn, name).seqpar_part = None


def _join(parts: list, i: int):
    """torch.cat of parts[i] along the sequence, dropping the list's hold on the tiles."""
    joined = torch.cat(parts[i], dim=1)
    parts[i] = None
    return joined


def _check_layer(layer) -> None:
    missing = [p for p in _PARTS if not hasattr(layer, p)]
    if missing or not hasattr(getattr(layer, "self_attn", None), "o_proj"):
        raise SeqparError(f"parallel.tiled_layer needs a pre-norm decoder layer with {', '.join(_PARTS)} "
                          f"and self_attn.o_proj (Llama, Qwen2, Qwen3, Mistral); "
                          f"{type(layer).__name__} lacks {', '.join(missing) or 'self_attn.o_proj'}. "
                          f"Use parallel.tiled_mlp instead.")


def _run(fn, *args):
    """`fn(*args)`, recomputed in backward when gradients are being recorded."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _TiledLayer:
    """The forward of one tiled decoder layer (it replaces `layer.forward`)."""

    seqpar_tiled = True

    def __init__(self, layer, plain_forward, tile_tokens: int, groups: int):
        self.layer, self.attn, self.plain_forward = layer, layer.self_attn, plain_forward
        self.tile_tokens, self.groups = tile_tokens, groups
        for name in _PROJECTIONS:
            linear = getattr(self.attn, name)
            linear.forward = _part_forward(linear, linear.forward, self.attn)
        config = self.attn.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.call = None  # how the module called attention (mask, kwargs), seen in stage 1

    def project(self, x, cos, sin, kwargs, group=None):
        """Stage 1 on one tile (of `group`'s heads): (q, k, v) in bshd."""
        attn, capture = self.attn, _Capture()
        attn.seqpar_capture = capture
        try:
            with _group_parts(attn, group):
                attn(self.layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=None, **kwargs)
        finally:
            attn.seqpar_capture = None
        self.call = capture.call
        return capture.qkv

    def attend(self, xs, bounds, cos, sin, kwargs, group=None):
        """Stages 1-2 over the whole shard: the attention output [b, s, heads * d]."""
        tiles = [_run(partial(self.project, kwargs=kwargs, group=group), x, cos[:, a:e], sin[:, a:e])
                 for x, a, e in zip(xs, bounds, bounds[1:])]
        parts = [list(p) for p in zip(*tiles)]
        del tiles
        q, k, v = (_join(parts, i) for i in range(3))  # each one's tiles freed once it is joined
        mask, call = self.call
        attention = ALL_ATTENTION_FUNCTIONS[self.attn.config._attn_implementation]
        out, _ = attention(self.attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, **call)
        return out.reshape(*out.shape[:2], -1)

    def finish(self, x, out):
        """Stage 3 on one tile: o_proj + residual, post-attention norm, MLP + residual."""
        h = x + self.attn.o_proj(out)
        return h + self.post_attention(h)

    def post_attention(self, h):
        """Stage 3's token-wise branch on one tile of h: post-attention norm and MLP."""
        return self.layer.mlp(self.layer.post_attention_layernorm(h))

    def project_group(self, out, group):
        """o_proj on one tile of a head group's attention output: the group's columns."""
        with _group_parts(self.attn, group):
            return self.attn.o_proj(out)

    def tiled(self, hidden_states, position_embeddings, kwargs):
        cos, sin = position_embeddings
        xs = hidden_states.split(self.tile_tokens, dim=1)
        bounds = [0]
        for x in xs:
            bounds.append(bounds[-1] + x.shape[1])
        if self.groups == 1:
            outs = self.attend(xs, bounds, cos, sin, kwargs).split(self.tile_tokens, dim=1)
            return torch.cat([_run(self.finish, x, o) for x, o in zip(xs, outs)], dim=1)
        # h = x + the groups' parts, then stage 3 per tile on h, as one recomputed Function
        # (`recomputed_layer.py`): one group's part alive at a time.
        parts = [(lambda *xs, group=group: self.attend(xs, bounds, cos, sin, kwargs, group),
                  partial(self.project_group, group=group))
                 for group in head_groups(self.heads, self.kv_heads, self.groups)]
        layer = self.layer
        f_params = [*layer.post_attention_layernorm.parameters(), *layer.mlp.parameters()]
        checkpointed = layer.gradient_checkpointing and layer.training
        return recomputed_layer(hidden_states, parts, self.post_attention, self.tile_tokens, layer,
                                list(self.attn.o_proj.parameters()), f_params, keep_h=not checkpointed)

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self.layer
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_embeddings = kwargs.get("position_embeddings")
        if (args or cache is not None or position_embeddings is None or kwargs.get("attention_mask") is not None
                or hidden_states.shape[1] <= self.tile_tokens):
            return self.plain_forward(hidden_states, *args, **kwargs)
        # Tensors of the whole sequence or per-token bookkeeping stay with the plain call only.
        for name in ("attention_mask", "position_ids", "position_embeddings", "cache", "past_key_values",
                     "use_cache", "cache_position"):
            kwargs.pop(name, None)
        go = partial(self.tiled, position_embeddings=position_embeddings, kwargs=kwargs)
        if (layer.gradient_checkpointing and layer.training and torch.is_grad_enabled()
                and self.groups == 1):  # in groups the layer is a checkpoint of its own
            return layer._gradient_checkpointing_func(go, hidden_states)  # as GradientCheckpointingLayer does
        return go(hidden_states)


def use_tiled_layer(model, tile_tokens: int = 8192, head_groups: int = 1, ulysses: int = 1) -> int:
    """Tile every decoder layer of `model` (and its final norm) by `tile_tokens` tokens;
    returns how many layers were tiled. `head_groups`: run attention in that many groups
    of heads (`ulysses`: the Ulysses size attention runs with). Raises SeqparError for
    layers of another shape or groups that do not fit."""
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    for layer in layers:
        _check_layer(layer)
    config = model.config
    heads = config.num_attention_heads
    check_head_groups(heads, getattr(config, "num_key_value_heads", None) or heads, head_groups, ulysses)
    count = 0
    for layer in layers:
        if getattr(layer.forward, "seqpar_tiled", False):
            continue
        layer.forward = _TiledLayer(layer, layer.forward, tile_tokens, head_groups)
        count += 1
    norm = getattr(decoder, "norm", None)
    if norm is not None and not getattr(norm.forward, "seqpar_tiled", False):
        tile_tokenwise(norm, tile_tokens)
    return count
