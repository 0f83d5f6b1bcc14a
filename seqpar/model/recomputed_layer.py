"""A decoder layer in head groups as one autograd Function that saves only its input.

    h = x + sum over groups g of project_g(attend_g(x)),   y = h + f(h)

(attend_g: the group's q/k/v projection, RoPE and attention; project_g: its part of o_proj;
f: the post-attention norm and the MLP; all but attention token by token.)

Forward keeps x alone (and h where the layer is not checkpointed). Backward recomputes h
(each group's forward, nothing recorded), then takes f's backward tile by tile, then
each group's backward on its own:

- dh_i = dy_i + f'(h_i)^T dy_i needs only tile i of dy, so it is written over dy in place
  (when nothing else holds dy, `_owned`; otherwise dy is copied first). Checkpointing
  per tile gives the same numbers but keeps dy until the last tile beside dh's tiles,
  then joins them: three full-length gradients at once instead of one.
- every group needs all of dh, so dx gets a buffer of its own; each tile's gradient is
  added into it as soon as it exists instead of being kept per tile and joined.
- project_g runs tile by tile, forward (added into h in place) and backward (dh's tile to
  the group's output gradient): no group makes a [tokens, hidden] tensor.

So a layer's backward holds x, dy (becoming dh), h (until f's backward is done), dx and
one group's recomputed tensors. The layer needs no checkpoint around it: it is one.
Backward runs the recompute and its backward itself (the pattern of reentrant
checkpointing): parameters get their gradients through a nested backward, and module
hooks (DeepSpeed ZeRO's gathers) run as in any recompute. An empty `anchor` input that
needs a gradient makes backward run even when x needs none (frozen embeddings).

`tile_tokenwise` runs a per-token module (the final norm) the same way: its input
gradient is written over its output gradient (the tiled loss's, made in its shape).
"""

from __future__ import annotations

import torch


def _owned(grad: torch.Tensor) -> bool:
    """True when `grad` is a plain tensor no one else holds, so it may be overwritten.
    `_use_count` is private: without it, always copy."""
    use_count = getattr(grad, "_use_count", None)
    return (use_count is not None and use_count() == 1 and not grad._is_view()
            and grad.is_contiguous() and not grad.requires_grad)


def _backward(out: torch.Tensor, grad: torch.Tensor) -> None:
    if out.requires_grad:  # else nothing in this part is trained
        torch.autograd.backward(out, grad)


def _adder(acc: torch.Tensor):
    """A hook that adds a tile's gradient into `acc` and drops it from the tile."""
    def add(tile):
        acc.add_(tile.grad)
        tile.grad = None
    return add


def _attention_block(x, parts, tile_tokens):
    """x + the sum of the parts: each part's output (one alive at a time) projected tile by
    tile and added into h in place."""
    tiles = x.split(tile_tokens, dim=1)
    h = x.clone()
    for attend, project in parts:
        out = attend(*tiles)
        for h_tile, out_tile in zip(h.split(tile_tokens, dim=1), out.split(tile_tokens, dim=1)):
            h_tile.add_(project(out_tile))
        del out
    return h


def _mlp_block(h, f, tile_tokens):
    return torch.cat([tile + f(tile) for tile in h.split(tile_tokens, dim=1)], dim=1)


def _ready(params, ready: bool) -> None:
    """Tell DeepSpeed ZeRO whether the coming backward call is the last to add to these
    parameters' gradients: it reduces a gradient when it is accumulated, so earlier calls
    of a loop over tiles or groups must only accumulate (ZeRO reads `ds_grad_is_ready`,
    DeepSpeed's own tiled MLP sets it the same way; without ZeRO it is unused)."""
    for p in params:
        p.ds_grad_is_ready = ready


def _over_dy(x, dy, residual):
    """Where x's gradient goes: over dy when no one else holds it, else a buffer of its own
    (starting as dy for a residual block)."""
    if _owned(dy) and dy.dtype == x.dtype and dy.shape == x.shape:
        return dy
    return dy.to(x.dtype, copy=True, memory_format=torch.contiguous_format) if residual else torch.empty_like(x)


def _tiles_backward(x, dy, f, tile_tokens, params, into, residual=False, last=True):
    """The gradient of x for y = f(x) (+ x with `residual`), f per token (its parameters
    `params`), recomputed tile by tile and written into `into` tile by tile (which may be
    dy itself: dy's tile i is not needed once tile i is done). `last`: whether this is the
    last loop over tiles that adds to the parameters' gradients."""
    tiles = x.split(tile_tokens, dim=1)
    for i, (tile, dy_tile, into_tile) in enumerate(zip(tiles, dy.split(tile_tokens, dim=1),
                                                       into.split(tile_tokens, dim=1))):
        leaf = tile.detach().requires_grad_()
        with torch.enable_grad():
            out = f(leaf)
        _ready(params, last and i == len(tiles) - 1)
        _backward(out, dy_tile)
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(tile)
        if residual:
            into_tile.add_(grad)  # dy_i + f'(x_i)^T dy_i: the residual's share and f's
        else:
            into_tile.copy_(grad)
        del out, leaf, grad
    return into


def _attention_block_backward(x, dh, parts, tile_tokens, want_dx, params):
    """dx, each part recomputed and backpropagated on its own; `params`: (attend's, project's)."""
    dx = torch.zeros_like(x) if want_dx else None
    for g, (attend, project) in enumerate(parts):
        last = g == len(parts) - 1
        tiles = [t.detach().requires_grad_(want_dx) for t in x.split(tile_tokens, dim=1)]
        if want_dx:
            for tile, acc in zip(tiles, dx.split(tile_tokens, dim=1)):
                tile.register_post_accumulate_grad_hook(_adder(acc))
        with torch.enable_grad():
            out = attend(*tiles)
        # project per tile: no full-width [tokens, hidden] tensor of the part
        dout = _tiles_backward(out, dh, project, tile_tokens, params[1], torch.empty_like(out), last=last)
        _ready(params[0], last)
        _backward(out, dout)
        del out, dout, tiles
    return dx.add_(dh) if want_dx else None


def _needs_backward(x: torch.Tensor, module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class _RecomputedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, parts, f, tile_tokens, keep_h, params):
        ctx.parts, ctx.f, ctx.tile_tokens, ctx.params = parts, f, tile_tokens, params
        h = _attention_block(x, parts, tile_tokens)
        ctx.save_for_backward(x, h if keep_h else None)
        return _mlp_block(h, f, tile_tokens)

    @staticmethod
    def backward(ctx, dy):
        x, h = ctx.saved_tensors
        attend_params, project_params, f_params = ctx.params
        try:
            if h is None:
                h = _attention_block(x, ctx.parts, ctx.tile_tokens)  # grad mode is off here
            dh = _tiles_backward(h, dy, ctx.f, ctx.tile_tokens, f_params, _over_dy(h, dy, True), residual=True)
            del h, dy
            dx = _attention_block_backward(x, dh, ctx.parts, ctx.tile_tokens, ctx.needs_input_grad[0],
                                           (attend_params, project_params))
        finally:
            _ready(attend_params + project_params + f_params, True)
        return dx, None, None, None, None, None, None


def recomputed_layer(x: torch.Tensor, parts: list, f, tile_tokens: int, module, project_params: list,
                     f_params: list, keep_h: bool = False) -> torch.Tensor:
    """y = h + f(h), h = x + sum of project(attend(*tiles of x)) over `parts` (pairs of
    callables), in tiles of `tile_tokens` tokens (dim 1). `module`: the layer; every
    project uses `project_params` (slices of one o_proj), f uses `f_params`, every attend
    the rest of `module`'s parameters. With gradients to record, only x is kept (and h,
    with `keep_h`: a layer that is not checkpointed skips recomputing it) and the rest is
    recomputed in backward."""
    if _needs_backward(x, module):
        taken = {id(p) for p in project_params + f_params}
        attend_params = [p for p in module.parameters() if id(p) not in taken]
        return _RecomputedLayer.apply(x, x.new_empty(0).requires_grad_(), parts, f, tile_tokens, keep_h,
                                      (attend_params, list(project_params), list(f_params)))
    return _mlp_block(_attention_block(x, parts, tile_tokens), f, tile_tokens)


class _TokenwiseTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, f, tile_tokens, params):
        ctx.f, ctx.tile_tokens, ctx.params = f, tile_tokens, params
        ctx.save_for_backward(x)
        return torch.cat([f(tile) for tile in x.split(tile_tokens, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        try:
            dx = _tiles_backward(x, dy, ctx.f, ctx.tile_tokens, ctx.params, _over_dy(x, dy, False))
        finally:
            _ready(ctx.params, True)
        return dx, None, None, None, None


def tile_tokenwise(module, tile_tokens: int) -> None:
    """Run a per-token `module` (the final RMSNorm) over sequence tiles, recomputed in
    backward, its input gradient written over its output gradient (one full-length
    gradient instead of the tiles' and their join)."""
    plain_forward = module.forward

    def forward(x):
        if x.shape[1] > tile_tokens and _needs_backward(x, module):
            return _TokenwiseTiles.apply(x, x.new_empty(0).requires_grad_(), plain_forward, tile_tokens,
                                         list(module.parameters()))
        return plain_forward(x)

    forward.seqpar_tiled = True
    module.forward = forward
