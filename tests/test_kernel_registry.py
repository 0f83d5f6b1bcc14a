"""The per-block kernel registry: what serves which block, the self-test, rank agreement.

Library glue is checked against the float64 oracle wherever it runs on the CPU: PyTorch's
CPU flash op shares the bhsd + LSE contract of the CUDA flash op. CUDA backends are
checked here only for what they declare (no GPU on CI); on a GPU the self-test guards them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from seqpar.errors import SeqparError
from seqpar.ops import attention, attention_reference, library_kernels, registry
from seqpar.ops.attention import run_backward, run_forward
from seqpar.ops.masks import (BOTTOM_RIGHT, CAUSAL, DOCUMENTS, EMPTY, NONE, POSITIONS, SHIFTED,
                              TOP_LEFT, classify_mask)
from seqpar.ops.varlen import varlen_attention_reference, varlen_from_doc_ids
from seqpar.parallel.layout import shard_positions

from .distributed import run_distributed

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    registry.set_attention_kernel(None)
    registry.reset()
    yield
    registry.set_attention_kernel(None)
    registry.reset()


def test_mask_kinds_from_positions():
    ar = torch.arange
    assert classify_mask(8, 8, causal=False).kind == NONE
    assert classify_mask(8, 8, causal=True).kind == CAUSAL
    assert classify_mask(4, 8, causal=True).kind == BOTTOM_RIGHT  # no positions: flash-attn's default
    assert classify_mask(4, 8, causal=True, q_positions=ar(4), k_positions=ar(8)).kind == TOP_LEFT
    assert classify_mask(4, 4, causal=True, q_positions=ar(10, 14), k_positions=ar(4)).kind == NONE
    assert classify_mask(4, 4, causal=True, q_positions=ar(4), k_positions=ar(10, 14)).kind == EMPTY
    # zigzag: a rank's own two chunks, positions [0,1,6,7], are the plain diagonal
    zz = shard_positions(8, 0, 2, "zigzag")
    assert classify_mask(4, 4, causal=True, q_positions=zz, k_positions=zz).kind == CAUSAL
    # stripe: the block of a later rank is the diagonal shifted down by one
    mine, later = shard_positions(12, 0, 3, "stripe"), shard_positions(12, 1, 3, "stripe")
    kind = classify_mask(4, 4, causal=True, q_positions=mine, k_positions=later)
    assert (kind.kind, kind.offset) == (SHIFTED, -1)
    assert classify_mask(4, 4, causal=True, q_positions=ar(4).flip(0), k_positions=ar(4)).kind == POSITIONS
    docs = torch.tensor([0, 0, 1, 1])
    assert classify_mask(4, 4, causal=True, doc_ids=docs) == classify_mask(4, 4, causal=True, doc_ids=docs)
    assert classify_mask(4, 4, causal=True, doc_ids=docs).kind == DOCUMENTS
    assert classify_mask(4, 4, causal=True, doc_ids=(docs, docs + 1)).kind == POSITIONS
    assert classify_mask(4, 4, causal=False, doc_ids=torch.tensor([0, 1, 0, 1])).kind == POSITIONS


def test_cpu_selection_table():
    want = {NONE: "flash", CAUSAL: "flash", TOP_LEFT: "flash", BOTTOM_RIGHT: "seqpar",
            DOCUMENTS: "seqpar", POSITIONS: "seqpar"}
    for kind, name in want.items():
        assert registry.select(CPU, torch.float32, 64, kind).name == name, kind
    # A gradient on lse needs a kernel that takes delta: PyTorch's flash recomputes it.
    assert registry.select(CPU, torch.float32, 64, CAUSAL, custom_delta=True).name == "seqpar"


def test_cuda_declarations():
    """What each CUDA backend claims (the self-test checks the claims on a GPU)."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    by_name = {b.name: b for b in registry.ALL_BACKENDS if b.device_type == "cuda"}
    assert by_name["flash"].serves(cuda, bf16, 128, CAUSAL)
    assert by_name["flash"].serves(cuda, bf16, 128, BOTTOM_RIGHT)  # FA2 inside: bottom-right (measured, H200)
    assert not by_name["flash"].serves(cuda, bf16, 128, TOP_LEFT)
    assert by_name["cudnn"].serves(cuda, bf16, 128, TOP_LEFT)
    assert by_name["flash-attn"].serves(cuda, bf16, 128, BOTTOM_RIGHT)  # FA2: bottom-right
    assert not by_name["flash-attn"].serves(cuda, bf16, 128, TOP_LEFT)
    assert not by_name["flash"].serves(cuda, torch.float32, 128, CAUSAL)
    assert not by_name["cudnn"].serves(cuda, bf16, 128, DOCUMENTS)
    assert by_name["seqpar"].serves(cuda, bf16, 80, DOCUMENTS)
    assert not by_name["seqpar"].serves(cuda, bf16, 96, CAUSAL)
    assert by_name["torch"].serves(cuda, torch.float32, 96, POSITIONS)
    assert [b.name for b in registry.order("cuda")] == list(registry.AUTO_ORDER["cuda"])


def test_preference_order(monkeypatch):
    assert [b.name for b in registry.order("cpu")] == ["flash", "seqpar", "torch"]
    monkeypatch.setenv(registry.ENV, "torch")
    assert [b.name for b in registry.order("cpu")] == ["torch", "flash", "seqpar"]
    assert registry.select(CPU, torch.float32, 64, CAUSAL).name == "torch"
    registry.set_attention_kernel("seqpar")  # the run config wins over the environment
    assert registry.select(CPU, torch.float32, 64, CAUSAL).name == "seqpar"
    with pytest.raises(SeqparError, match="one of auto, flash"):
        registry.set_attention_kernel("flash3")
    registry.set_attention_kernel(None)
    monkeypatch.setenv(registry.ENV, "fast")
    with pytest.raises(SeqparError, match="SEQPAR_ATTENTION_KERNEL"):
        registry.order("cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_flash_glue_against_oracle(dtype):
    """Forward and backward through the shared glue, GQA, every kind it serves (the
    stripe's shifted diagonal through the dispatcher's cut), with the final LSE."""
    verdict = registry.verify(library_kernels.CPU_FLASH, CPU, dtype, 80)
    assert verdict.ok, verdict.error
    assert verdict.max_error < registry.TOLERANCE[dtype] and set(verdict.kinds) == {NONE, CAUSAL, TOP_LEFT}
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 12, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    mine, later = shard_positions(36, 0, 3, "stripe"), shard_positions(36, 1, 3, "stripe")
    mask = dict(causal=True, q_positions=mine, k_positions=later)
    kind = classify_mask(12, 12, **mask)
    out, lse = run_forward(library_kernels.CPU_FLASH, q, k, v, None, mask, kind)
    grads = run_backward(library_kernels.CPU_FLASH, dout, q, k, v, out, lse, None, None, mask, kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, **mask)
    ref_out.backward(dout)
    torch.testing.assert_close(out, ref_out.detach())
    torch.testing.assert_close(lse, ref_lse.detach())  # row 0 sees no key: -inf on both sides
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_sdpa_causal_is_top_left_on_cpu():
    """Pins the alignment the CPU flash backend relies on: is_causal with sq < sk."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, 2, 8, generator=g, dtype=torch.float64) for s in (4, 8, 8))
    out, _ = library_kernels._cpu_flash_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True, None)
    top_left, _ = attention_reference(q, k, v, causal=True, q_positions=torch.arange(4), k_positions=torch.arange(8))
    bottom_right, _ = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.transpose(1, 2), top_left)
    assert not torch.allclose(out.transpose(1, 2), bottom_right)


def test_gradient_through_lse_uses_a_delta_kernel():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 16, h, 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out, lse = attention(q, k, v, causal=True)
    torch.autograd.backward((out.sum() + lse.sum()))
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_out, ref_lse = attention_reference(q, k, v, causal=True)
    torch.autograd.backward((ref_out.sum() + ref_lse.sum()))
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


def _assert_matches_oracle(q, k, v, mask):
    """out, lse and dq/dk/dv of `attention` (as the registry serves it) equal the oracle's."""
    out, lse = attention(q, k, v, **mask)
    out.square().sum().backward()
    got = [out, lse] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_out, ref_lse = attention_reference(q, k, v, **mask)
    ref_out.square().sum().backward()
    for a, b in zip(got, [ref_out, ref_lse, q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sq,sk,first_pos", [(16, 48, 32), (32, 48, 16), (16, 40, 30), (20, 40, 25)])
def test_diagonal_above_the_main_one_runs_as_two_flash_blocks(sq, sk, first_pos):
    """Bottom-right and shifted-up causal blocks (offset > 0): keys [:offset] unmasked plus
    the aligned rest, merged by LSE; exact against the oracle, and no seqpar kernel ran."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, h, 16, generator=g, dtype=torch.float64, requires_grad=True)
               for s, h in ((sq, 4), (sk, 2), (sk, 2)))
    mask = dict(causal=True, q_positions=torch.arange(sq) + first_pos, k_positions=torch.arange(sk))
    assert classify_mask(sq, sk, **mask).kind in (BOTTOM_RIGHT, SHIFTED)
    _assert_matches_oracle(q, k, v, mask)
    served = registry.served_summary("cpu")
    assert all(names == ["flash"] for names in served.values()), served


@pytest.mark.parametrize("kernel", ["auto", "seqpar", "torch"])
def test_diagonal_below_with_fewer_keys_than_rows_is_top_left_on_every_kernel(kernel):
    """A diagonal shifted down whose cut block has more rows than keys is top-left causal:
    kernels that read positions must be given them (their default is bottom-right)."""
    registry.set_attention_kernel(kernel)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, s, h, 16, generator=g, dtype=torch.float64, requires_grad=True)
               for s, h in ((32, 4), (8, 2), (8, 2)))
    mask = dict(causal=True, q_positions=torch.arange(32) - 4, k_positions=torch.arange(8))
    assert classify_mask(32, 8, **mask).offset == -4
    _assert_matches_oracle(q, k, v, mask)


def test_varlen_construction_matches_document_mask():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 6, 6, 6, 6, 7, 7]])
    cu, longest = varlen_from_doc_ids(docs)
    assert cu.tolist() == [0, 3, 5, 8, 10, 14, 16] and longest == 4 and cu.dtype == torch.int32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, h, 16, generator=g, dtype=torch.float64) for h in (4, 4, 4))
    for causal in (False, True):
        out, lse = varlen_attention_reference(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                              longest, longest, 0.0, causal)
        ref_out, ref_lse = attention_reference(q, k, v, causal=causal, doc_ids=docs)
        torch.testing.assert_close(out.reshape(2, 8, 4, 16), ref_out)
        torch.testing.assert_close(lse.reshape(4, 2, 8).transpose(0, 1), ref_lse)


def _broken_forward(q, k, v, scale, mask):
    out, lse = library_kernels._cpu_flash_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              mask["kind"].kind != NONE, scale)
    return out.transpose(1, 2) * 1.01, lse  # a plausible-looking wrong answer


def _broken_rank_worker(broken_rank: int):
    import dataclasses

    from seqpar.parallel import ring_attention, shard
    rank = torch.distributed.get_rank()
    if rank == broken_rank:  # only this rank's copy of PyTorch's kernel is wrong
        broken = dataclasses.replace(library_kernels.CPU_FLASH, forward=_broken_forward)
        registry.ALL_BACKENDS[registry.ALL_BACKENDS.index(library_kernels.CPU_FLASH)] = broken
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 32, h, 16, generator=g) for h in (4, 2, 2))
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    local = [shard(t, None, dim=1, layout="zigzag") for t in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ring_attention(*local, causal=True, layout="zigzag")
        ring_attention(*local, causal=True, layout="zigzag")
    err = (out.double() - shard(ref, None, dim=1, layout="zigzag")).abs().max().item()
    disabled = [str(w.message) for w in caught if "'flash' disabled" in str(w.message)]
    return err, disabled, registry.served_summary("cpu")


def test_broken_kernel_is_disabled_on_every_rank():
    results = run_distributed(_broken_rank_worker, 2, 1)
    for rank, (err, disabled, served) in enumerate(results):
        assert err < 1e-5, (rank, err)
        assert len(disabled) == 1, (rank, disabled)  # one warning, not one per call
        assert ("max error" in disabled[0]) == (rank == 1) and "flash" not in sum(served.values(), [])
        assert ("another rank" in disabled[0]) == (rank == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_glue_without_native_gqa_calls_the_op_per_group_offset(dtype):
    """An op without GQA (PyTorch's fused CUDA ops) is called once per offset in a
    query-head group on the unexpanded K/V; the result equals the oracle, forward and
    backward. The CPU flash op, declared without GQA, stands in for the CUDA ops."""
    seen = []

    def fwd(q, k, v, causal, scale):
        seen.append(("fwd", q.shape[1], k.shape[1]))
        return library_kernels._cpu_flash_fwd(q, k, v, causal, scale)

    def bwd(dout, q, k, v, out, lse, causal, scale):
        seen.append(("bwd", q.shape[1], k.shape[1]))
        return library_kernels._cpu_flash_bwd(dout, q, k, v, out, lse, causal, scale)

    backend = library_kernels.fused_backend("flash-no-gqa", "cpu", (dtype,), library_kernels.TOP_LEFT_KINDS,
                                            fwd, bwd, native_gqa=False)
    assert registry.verify(backend, CPU, dtype, 16).ok
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 20, h, 16, generator=g, dtype=torch.float64) for h in (6, 2, 2, 6))
    seen.clear()
    kind = classify_mask(20, 20, causal=True)
    low = [t.to(dtype) for t in (q, k, v, dout)]
    out, lse = run_forward(backend, *low[:3], None, {"causal": True}, kind)
    grads = run_backward(backend, low[3], *low[:3], out, lse, None, None, {"causal": True}, kind)
    assert seen == [("fwd", 2, 2)] * 3 + [("bwd", 2, 2)] * 3  # 3 calls of 2 heads each way, bhsd
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, causal=True)
    ref_out.backward(dout)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.double(), ref_out.detach(), **tol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), **tol)
    for got, leaf in zip(grads, leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), leaf.grad, **tol)
