"""The recomputed blocks of the tiled layer (`seqpar/model/recomputed_layer.py`) give the
gradients of the plain computation, also when the output gradient they overwrite in place
is shared with another consumer, when the input needs no gradient (frozen embeddings) but
the parameters do, and when the parameters are frozen but the input is not."""

from __future__ import annotations

import torch
from torch import nn

from seqpar.model.recomputed_layer import recomputed_layer, tile_tokenwise

TILE = 3  # does not divide the 10 tokens: the last tile is short


class _Layer(nn.Module):
    """A decoder-layer shape in two head groups (halves of q's rows and o's columns):
    attend mixes tokens, project and f are per token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))

    def attend(self, g, x):
        q = nn.functional.linear(x, self.q.weight[4 * g:4 * g + 4], self.q.bias[4 * g:4 * g + 4])
        return torch.cumsum(q, dim=1) / torch.arange(1, x.shape[1] + 1)[None, :, None]  # causal mean

    def project(self, g, out):
        return nn.functional.linear(out, self.o.weight[:, 4 * g:4 * g + 4], self.o.bias if g == 0 else None)

    def plain(self, x):
        h = x + self.o(torch.cat([self.attend(g, x) for g in range(2)], dim=-1))
        return h + self.mlp(h)

    def tiled(self, x, keep_h=False):
        parts = [(lambda *xs, g=g: self.attend(g, torch.cat(xs, dim=1)), lambda out, g=g: self.project(g, out))
                 for g in range(2)]
        return recomputed_layer(x, parts, self.mlp, TILE, self, list(self.o.parameters()),
                                list(self.mlp.parameters()), keep_h=keep_h)


def _grads(model, x, run):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    out = run(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same(got, want):
    out, dx, dps = got
    want_out, want_dx, want_dps = want
    torch.testing.assert_close(out, want_out)
    assert (dx is None) == (want_dx is None)
    if dx is not None:
        torch.testing.assert_close(dx, want_dx)
    for a, b in zip(dps, want_dps):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_recomputed_layer_equals_the_plain_layer():
    model, x = _Layer(), torch.randn(2, 10, 8)
    for keep_h in (False, True):
        _assert_same(_grads(model, x.requires_grad_(), lambda t: model.tiled(t, keep_h)),
                     _grads(model, x, model.plain))


def test_frozen_input_still_trains_the_parameters_and_frozen_parameters_still_pass_gradients():
    model, x = _Layer(), torch.randn(2, 10, 8)
    _assert_same(_grads(model, x, model.tiled), _grads(model, x, model.plain))  # x needs no grad
    model.requires_grad_(False)
    x.requires_grad_()
    _assert_same(_grads(model, x, model.tiled), _grads(model, x, model.plain))


def test_a_shared_output_gradient_is_not_overwritten():
    """y1 + y2 hands the same gradient tensor to both blocks: the first to run must not
    write its input gradient over it."""
    model, x = _Layer(), torch.randn(2, 10, 8, requires_grad=True)
    norm = nn.LayerNorm(8)
    tile_tokenwise(norm, TILE)

    def tiled(t):
        return model.tiled(t) + norm(t * 2)

    def plain(t):
        return model.plain(t) + nn.functional.layer_norm(t * 2, (8,), norm.weight, norm.bias)

    _assert_same(_grads(model, x, tiled), _grads(model, x, plain))


def test_tokenwise_tiles_equal_the_module():
    torch.manual_seed(0)
    norm, x = nn.LayerNorm(8), torch.randn(2, 10, 8, requires_grad=True)
    want = _grads(norm, x, norm)
    tile_tokenwise(norm, TILE)
    _assert_same(_grads(norm, x, norm), want)
