"""Tiled MLP: each decoder layer's MLP runs over sequence tiles, recomputed in backward.

The MLP is per token, so tiling along the sequence changes no number. What it changes is
memory: a plain MLP keeps [seq, intermediate] activations (gate, up, their product) of
the whole shard alive for backward (intermediate is ~3.5x hidden); tiled, only one tile's
exist at a time and backward recomputes them tile by tile from the tile's input.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _tiled_forward(plain_forward, tile_tokens: int):
    def forward(hidden_states, *args, **kwargs):
        seq = hidden_states.shape[1]
        if seq <= tile_tokens or not torch.is_grad_enabled():
            return plain_forward(hidden_states, *args, **kwargs)
        tiles = hidden_states.split(tile_tokens, dim=1)
        outs = [checkpoint(plain_forward, tile, *args, use_reentrant=False, **kwargs) for tile in tiles]
        return torch.cat(outs, dim=1)

    forward.seqpar_tiled = True
    return forward


def tile_module(module, tile_tokens: int) -> bool:
    """Run a per-token `module` (an MLP, an RMSNorm) over sequence tiles, a checkpoint
    per tile; False if it already was. (The tiled layer's final norm and blocks use
    `recomputed_layer`, whose backward also writes the input gradient over the output
    gradient; the tiled MLP stays as measured, README "Memory".)"""
    if getattr(module.forward, "seqpar_tiled", False):
        return False
    module.forward = _tiled_forward(module.forward, tile_tokens)
    return True


def use_tiled_mlp(model, tile_tokens: int = 8192) -> int:
    """Tile the `mlp` of every decoder layer of `model`; returns how many were tiled."""
    count = 0
    for layer in model.get_decoder().layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and tile_module(mlp, tile_tokens):
            count += 1
    return count
