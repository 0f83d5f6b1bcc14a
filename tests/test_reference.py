"""The oracle and the local block kernel, single process.

The oracle is checked against the most literal attention there is (expanded K/V,
boolean mask, torch.softmax) and against torch's SDPA; the block kernel
(`seqpar.ops.attention`, what ring attention calls) is checked against the oracle,
forward and backward, including gradients that flow through lse.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from seqpar import SeqparError
from seqpar.ops import attention, attention_reference


def literal_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v with K/V expanded to every query head."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def random_inputs(b, sq, sk, hq, hk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(b, sq, hq, d), make(b, sk, hk, d), make(b, sk, hk, d)


@pytest.mark.parametrize("causal,hq,hk,d", list(itertools.product((False, True), (4, 8), (1, 4), (16, 80))))
def test_oracle_equals_literal_attention(causal, hq, hk, d):
    q, k, v = random_inputs(2, 9, 9, hq, hk, d)
    out, lse = attention_reference(q, k, v, causal=causal)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None] if causal else None
    want_out, want_lse = literal_attention(q, k, v, mask, 1 / math.sqrt(d))
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_oracle_positions_and_documents():
    """Masks come from explicit positions and document ids, not from local indices."""
    q, k, v = random_inputs(2, 6, 10, 4, 2, 16)
    q_pos = torch.tensor([[4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 9]])
    k_pos = torch.arange(10)
    q_doc = torch.tensor([[0, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]])
    k_doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2], [0] * 5 + [1] * 5])
    out, lse = attention_reference(q, k, v, causal=True, q_positions=q_pos, k_positions=k_pos,
                                   doc_ids=(q_doc, k_doc))
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_doc[:, None, :] == q_doc[:, :, None])
    want_out, want_lse = literal_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_oracle_matches_sdpa():
    q, k, v = random_inputs(2, 16, 16, 8, 2, 32, dtype=torch.float32)
    out, _ = attention_reference(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = random_inputs(1, 4, 4, 2, 2, 8)
    docs = (torch.tensor([0, 0, 5, 5]), torch.tensor([0, 0, 1, 1]))  # queries 2, 3 see no key
    for fn in (attention_reference, attention):
        out, lse = fn(q, k, v, doc_ids=docs)
        assert torch.all(out[:, 2:] == 0) and torch.all(torch.isneginf(lse[..., 2:]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_oracle_gradcheck_float64():
    q, k, v = random_inputs(1, 5, 5, 4, 2, 8)
    docs = torch.tensor([0, 0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda *t: attention_reference(*t, causal=True, doc_ids=docs)[0], (q, k, v))


def test_block_kernel_gradcheck_float64():
    q, k, v = random_inputs(1, 5, 7, 4, 2, 8)
    kw = dict(causal=True, q_positions=torch.arange(2, 7), k_positions=torch.arange(7))
    assert torch.autograd.gradcheck(lambda *t: attention(*t, **kw), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,docs", [(False, False), (True, False), (True, True), (False, True)])
def test_block_kernel_matches_oracle_forward_and_backward(dtype, causal, docs):
    q, k, v = random_inputs(2, 12, 12, 8, 2, 80, dtype=dtype, seed=3)
    doc_ids = torch.tensor([0] * 5 + [1] * 4 + [2] * 3) if docs else None
    out, lse = attention(q, k, v, causal=causal, doc_ids=doc_ids)
    want_out, want_lse = attention_reference(q, k, v, causal=causal, doc_ids=doc_ids)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-5),
           torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    # Gradients through out AND lse (ring merging differentiates lse in some callers).
    g = torch.Generator().manual_seed(7)
    w_out = torch.randn(out.shape, generator=g).to(dtype)
    w_lse = torch.randn(lse.shape, generator=g).to(lse.dtype)
    got = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * w_out).sum() + (want_lse * w_lse).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_block_kernel_query_chunking(monkeypatch):
    """Chunking over queries (memory bound) gives the same numbers as one chunk."""
    import seqpar.ops.torch_attention as ta

    q, k, v = random_inputs(1, 33, 33, 4, 4, 16)
    whole = attention(q, k, v, causal=True)[0]
    monkeypatch.setattr(ta, "_MAX_SCORE_ELEMENTS", 4 * 33 * 5)  # 5 query rows per chunk
    chunked = attention(q, k, v, causal=True)[0]
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q, k.float(), v), "one dtype"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head_dim"),
    (lambda q, k, v: (q[:, :, :3], k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q[0], k, v), "bshd"),
])
def test_bad_inputs_name_the_fix(bad, match):
    q, k, v = random_inputs(1, 4, 4, 4, 2, 16)
    with pytest.raises(SeqparError, match=match):
        attention(*bad(q, k, v))
