"""seqpar.model.loss: tiled == plain == torch cross_entropy, and the SP-sharded loss equals
the unsharded one (loss on every rank, summed gradients), on gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar import SeqparError
from seqpar.bench.loss import run_loss_memory_bench
from seqpar.model.loss import default_chunk_size, sharded_cross_entropy
from seqpar.parallel import count_comm, init_mesh, shard, shard_positions

from .distributed import run_distributed

B, S, H, V = 2, 24, 16, 50


def make_inputs(seed=0, dtype=torch.float32, bias=True, batch=B, seq=S, ignored=()):
    """Random hidden/weight/bias/labels; ~1/4 of labels ignored, plus `ignored` positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.25] = -100
    labels[:, list(ignored)] = -100
    return hidden.to(dtype), weight.to(dtype), (b.to(dtype) if bias else None), labels


def loss_and_grads(fn, hidden, weight, bias, labels):
    """(loss, grad hidden, grad weight, grad bias) of fn(hidden, weight, bias, labels)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias)]
    loss = fn(*leaves, labels)
    loss.backward()
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


def torch_reference(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float()  # transformers' ForCausalLMLoss
    return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close(got, want, tol):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype
        assert rel_err(g, w) < tol, (rel_err(g, w), tol)


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_tiled_equals_plain_equals_torch(dtype, tol, bias):
    inputs = make_inputs(dtype=dtype, bias=bias)
    want = loss_and_grads(torch_reference, *inputs)
    plain = loss_and_grads(lambda h, w, b, y: sharded_cross_entropy(h, w, y, bias=b, tiled=False), *inputs)
    assert_close(plain, want, 1e-6 if dtype == torch.float32 else 1e-3)
    for chunk in (None, 1, 5, 7, 16, 47, 48, 1000):  # 48 = B * S tokens
        tiled = loss_and_grads(
            lambda h, w, b, y: sharded_cross_entropy(h, w, y, bias=b, chunk_size=chunk), *inputs)
        assert_close(tiled, want, tol)
        assert_close(tiled, plain, tol)
    if dtype == torch.bfloat16:  # and close to the float32 computation on the same inputs
        exact = loss_and_grads(torch_reference, *[t.float() if t is not None else None for t in inputs[:3]],
                               inputs[3])
        assert rel_err(tiled[0], exact[0]) < 1e-2 and rel_err(tiled[1], exact[1]) < 5e-2


def test_reductions_and_all_ignored():
    hidden, weight, bias, labels = make_inputs()
    per_token = sharded_cross_entropy(hidden, weight, labels, bias=bias, reduction="none", chunk_size=7)
    want = F.cross_entropy(F.linear(hidden, weight, bias).view(-1, V), labels.view(-1), reduction="none")
    assert per_token.shape == labels.shape and rel_err(per_token.view(-1), want) < 2e-6
    total = sharded_cross_entropy(hidden, weight, labels, bias=bias, reduction="sum", chunk_size=7)
    assert rel_err(total, want.sum()) < 2e-6

    none = torch.full_like(labels, -100)
    for tiled in (True, False):
        loss, gh, gw, gb = loss_and_grads(
            lambda h, w, b, y: sharded_cross_entropy(h, w, y, bias=b, tiled=tiled), hidden, weight, bias, none)
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in (gh, gw, gb))


def test_bad_inputs():
    hidden, weight, bias, labels = make_inputs()
    for kwargs, match in [(dict(labels=labels[:, :-1]), "labels"), (dict(weight=weight[:, :-1]), "weight"),
                          (dict(bias=bias[:-1]), "bias"), (dict(reduction="avg"), "reduction"),
                          (dict(chunk_size=0), "chunk_size"), (dict(labels=labels.float()), "integer")]:
        args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias) | kwargs
        with pytest.raises(SeqparError, match=match):
            sharded_cross_entropy(**args)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_builds_full_logits():
    vocab, tokens, chunk = 1000, 512, 64
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, tokens, 8, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    with _LargestTensor() as mode:
        sharded_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    assert mode.largest == chunk * vocab  # one chunk's logits; the full ones are 8x that
    with _LargestTensor() as mode:
        sharded_cross_entropy(hidden, weight, labels, tiled=False).backward()
    assert mode.largest == tokens * vocab
    assert default_chunk_size(131072) == 512 and default_chunk_size(10) == (256 << 20) // 40


# ----------------------------------------------------------------------------- SP ranks

CASES = [  # (layout, name of the ignored positions)
    ("zigzag", "random"), ("contiguous", "random"), ("zigzag", "last rank ignored"),
    ("contiguous", "first rank ignored"), ("zigzag", "all ignored"),
]


def case_inputs(case, sp, seed):
    layout, kind = case
    ignored = ()
    if kind == "last rank ignored":
        ignored = shard_positions(S, sp - 1, sp, layout).tolist()
    elif kind == "first rank ignored":
        ignored = shard_positions(S, 0, sp, layout).tolist()
    elif kind == "all ignored":
        ignored = range(S)
    return make_inputs(seed=seed, ignored=ignored)


def sharded_rank(sp):
    """Every case on this rank: loss, this rank's hidden-grad shard, weight and bias grads."""
    mesh = init_mesh(sp)
    group = mesh.sp_group
    dp_index = dist.get_rank() // sp  # different data on each DP replica
    out = []
    for case in CASES:
        hidden, weight, bias, labels = case_inputs(case, sp, seed=dp_index)
        layout = case[0]
        h_local = shard(hidden, group, dim=1, layout=layout)
        y_local = shard(labels, group, dim=1, layout=layout)
        for tiled in (True, False):
            with count_comm() as comm:
                loss, gh, gw, gb = loss_and_grads(
                    lambda h, w, b, y: sharded_cross_entropy(h, w, y, group, bias=b, tiled=tiled, chunk_size=5),
                    h_local, weight, bias, y_local)
            assert dict(comm.calls) == {"all_reduce": 1}
            out.append(dict(case=case, tiled=tiled, dp=dp_index, sp_rank=mesh.sp_rank,
                            loss=loss, grad_hidden=gh, grad_weight=gw, grad_bias=gb))
    return out


@pytest.mark.parametrize("world,sp", [(4, 2), (3, 3)])
def test_sharded_loss_equals_unsharded(world, sp):
    results = run_distributed(sharded_rank, world, sp, timeout=240)
    for dp in range(world // sp):
        ranks = [next(r for r in results if r[0]["dp"] == dp and r[0]["sp_rank"] == i) for i in range(sp)]
        for j, (case, tiled) in enumerate([(c, t) for c in CASES for t in (True, False)]):
            rows = [rank[j] for rank in ranks]
            assert all(row["case"] == case and row["tiled"] == tiled for row in rows)
            inputs = case_inputs(case, sp, seed=dp)
            loss, gh, gw, gb = loss_and_grads(torch_reference, *inputs)
            if case[1] == "all ignored":
                loss = torch.zeros(())  # torch's mean over nothing is NaN; ours is 0
                gh, gw, gb = (torch.zeros_like(t) for t in inputs[:3])
            for row in rows:  # the unsharded loss on every rank
                assert row["loss"].item() == rows[0]["loss"].item()
                assert abs(row["loss"].item() - loss.item()) <= 1e-5 * abs(loss.item())
            # Each rank's hidden gradient is d(global loss)/d(its shard)...
            full_gh = torch.zeros_like(gh)
            for i, row in enumerate(rows):
                full_gh[:, shard_positions(S, i, sp, case[0])] += row["grad_hidden"]
            # ...and the SP sum of parameter gradients is the unsharded gradient.
            sum_gw = sum(row["grad_weight"] for row in rows)
            sum_gb = sum(row["grad_bias"] for row in rows)
            for got, want in ((full_gh, gh), (sum_gw, gw), (sum_gb, gb)):
                if case[1] == "all ignored":
                    assert torch.count_nonzero(got) == 0
                else:
                    assert rel_err(got, want) < 1e-5, (case, tiled, rel_err(got, want))


# ----------------------------------------------------------------------------- benchmark

def test_loss_memory_bench_small(capsys):
    rows = run_loss_memory_bench(2048, vocab=16384, hidden=64, dtype="float32", chunk_size=128)
    base, tiled = rows
    assert (base["path"], tiled["path"]) == ("transformers", "seqpar tiled")
    assert base["error"] is None and tiled["error"] is None
    assert abs(base["loss"] - tiled["loss"]) < 1e-5 * base["loss"]
    # full float32 logits are 128 MiB here; one chunk's are 8 MiB
    assert base["peak_extra_bytes"] > 256 << 20 and tiled["peak_extra_bytes"] < 64 << 20
    assert "| seqpar tiled | 2048 | 16384 | 64 | float32 | 128 |" in capsys.readouterr().out
