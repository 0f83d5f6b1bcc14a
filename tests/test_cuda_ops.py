"""CUDA ops against the oracle (skipped without a GPU): bf16/fp16, seq up to 32K,
head_dim 64/128, GQA, causal by positions, packed documents, rope."""
from __future__ import annotations

import pytest
import torch

from seqpar.ops import apply_rope, apply_rope_from_positions, attention, attention_reference, compiled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def _cuda_ext():
    if not compiled.available(torch.device("cuda"), torch.bfloat16, head_dim=128):
        pytest.fail("seqpar CUDA ops did not build/load on a GPU machine; run `seqpar build-ext`")


def _rand(shape, dtype, g):
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def _oracle_chunked(q, k, v, **kw):
    """float32 oracle; long sequences go query-chunk by chunk to bound memory."""
    sq = q.shape[1]
    if sq * k.shape[1] * q.shape[2] <= (1 << 28):
        return attention_reference(q.float(), k.float(), v.float(), **kw)
    outs, lses = [], []
    step = max(1, (1 << 28) // (k.shape[1] * q.shape[2]))
    q_pos = kw.pop("q_positions", None)
    if q_pos is None and kw.get("causal"):
        q_pos = torch.arange(sq, device=q.device) + (k.shape[1] - sq)
    for s in range(0, sq, step):
        o, l = attention_reference(q[:, s:s + step].float(), k.float(), v.float(),
                                   q_positions=None if q_pos is None else q_pos[..., s:s + step], **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq,d,hq,hk", [(128, 64, 4, 4), (1000, 128, 8, 2), (4096, 128, 8, 1),
                                         (32768, 128, 2, 1), (2048, 64, 8, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_oracle(dtype, seq, d, hq, hk, causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _rand((1, seq, hq, d), dtype, g), _rand((1, seq, hk, d), dtype, g), _rand((1, seq, hk, d), dtype, g)
    out, lse = torch.ops.seqpar.attention_fwd(q, k, v, causal, d ** -0.5)
    ref_out, ref_lse = _oracle_chunked(q, k, v, causal=causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,hq,hk", [(64, 4, 2), (128, 8, 2), (80, 4, 4)])
def test_backward_with_positions_and_documents(dtype, d, hq, hk):
    g = torch.Generator(device="cuda").manual_seed(1)
    b, s = 2, 777
    q, k, v = _rand((b, s, hq, d), dtype, g), _rand((b, s, hk, d), dtype, g), _rand((b, s, hk, d), dtype, g)
    pos = torch.randperm(s, device="cuda")[None].expand(b, -1)  # zigzag-like shuffled positions
    docs = (torch.arange(s, device="cuda") // 300)[None].expand(b, -1)
    kw = dict(causal=True, q_positions=pos, k_positions=pos, doc_ids=docs)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.float().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*ours, **kw)
    ref_out, ref_lse = attention_reference(*refs, **kw)
    w = torch.randn(out.shape, device="cuda", generator=g)
    (out.float() * w).sum().backward()
    (ref_out * w).sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    for a, r in zip(ours, refs):
        torch.testing.assert_close(a.grad.float(), r.grad, atol=5 * tol, rtol=5 * tol)


def test_fully_masked_rows():
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (_rand((1, 64, 2, 64), torch.bfloat16, g) for _ in range(3))
    out, lse = torch.ops.seqpar.attention_fwd(q, k, v, True, 0.125, torch.arange(64, device="cuda"),
                                              torch.arange(64, device="cuda") + 32)
    assert torch.isneginf(lse[..., :32]).all() and (out[:, :32] == 0).all()
    assert torch.isfinite(lse[..., 32:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_matches_cpu(dtype):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 300, 8, 128, generator=g).to(dtype), torch.randn(2, 300, 2, 128, generator=g).to(dtype)
    pos = torch.randint(0, 10000, (2, 300), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    want = apply_rope_from_positions(q, k, pos, inv_freq, 1.2)
    got = apply_rope_from_positions(q.cuda(), k.cuda(), pos.cuda(), inv_freq.cuda(), 1.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol, rtol=tol)
    freqs = pos[..., None].float() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    qc, kc = q.cuda(), k.cuda()
    got = apply_rope(qc, kc, cos.cuda(), sin.cuda(), inplace=True)
    want = apply_rope(q, k, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
def test_library_kernels_run_gqa_per_group_offset(name):
    """PyTorch's fused CUDA ops have no GQA in seqpar's glue: one call per offset in a
    query-head group on the unexpanded K/V (Llama-3's 32/8 heads here), forward and
    backward against the float32 oracle, causal and not."""
    from seqpar.ops import library_kernels, registry
    from seqpar.ops.masks import classify_mask
    from seqpar.ops.rewrites import fixed, run_backward, run_forward

    backend = next(b for b in library_kernels.CUDA_LIBRARY if b.name == name)
    cuda = torch.device("cuda")
    if not backend.available(cuda, 128):
        pytest.skip(f"{name} is not available on this GPU")
    assert registry.verify(backend, cuda, torch.bfloat16, 128).ok
    g = torch.Generator(device="cuda").manual_seed(0)
    for causal in (True, False):
        q, dout = (_rand((1, 1024, 32, 128), torch.bfloat16, g) for _ in range(2))
        k, v = (_rand((1, 1024, 8, 128), torch.bfloat16, g) for _ in range(2))
        kind = classify_mask(1024, 1024, causal=causal)
        out, lse = run_forward(fixed(backend), q, k, v, None, {"causal": causal}, kind)
        grads = run_backward(fixed(backend), dout, q, k, v, out, lse, None, None, {"causal": causal}, kind)
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*leaves, causal=causal)
        ref_out.backward(dout.float())
        torch.testing.assert_close(out.float(), ref_out.detach(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.float(), ref_lse.detach(), atol=2e-2, rtol=2e-2)
        for got, leaf in zip(grads, leaves):
            assert got.dtype == torch.bfloat16 and got.shape == leaf.shape
            torch.testing.assert_close(got.float(), leaf.grad, atol=5e-2, rtol=5e-2)
