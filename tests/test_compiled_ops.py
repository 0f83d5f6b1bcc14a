"""The compiled CPU ops (csrc/) against the oracle and the pure-torch block kernel.

The extension is built once per machine (cached under ~/.cache/seqpar/ext); these tests
skip only when no C++ compiler works, which the build reports with one warning.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from seqpar.ops import _build, attention, attention_backend, attention_reference, compiled, torch_attention
from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(not compiled.loaded(), reason="seqpar compiled ops did not build "
                                f"({_build.extension_status().reason})")

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


def _inputs(dtype, b=2, sq=70, sk=150, hq=4, hk=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    return q, k, v, g


def _masks(kind, b, sq, sk, g):
    if kind == "none":
        return dict(causal=False)
    if kind == "causal":
        return dict(causal=True)
    q_pos = torch.randint(0, 2 * sk, (b, sq), generator=g)
    k_pos = torch.randint(0, 2 * sk, (sk,), generator=g)
    if kind == "positions":
        return dict(causal=True, q_positions=q_pos, k_positions=k_pos)
    docs = (torch.randint(0, 3, (b, sq), generator=g), torch.randint(0, 3, (b, sk), generator=g))
    return dict(causal=kind == "causal+docs", q_positions=q_pos, k_positions=k_pos, doc_ids=docs)


def test_backend_is_compiled_cpu():
    # The C++ op serves what PyTorch's CPU flash kernel cannot: documents and positions.
    assert "seqpar: causal-shifted,documents,positions" in attention_backend()
    assert _build.extension_status().kind == "CPU only"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hk", [4, 2, 1])
@pytest.mark.parametrize("kind", ["none", "causal", "positions", "docs", "causal+docs"])
def test_forward_backward_match_torch_path(dtype, hk, kind):
    q, k, v, g = _inputs(dtype, hk=hk)
    kw = _masks(kind, q.shape[0], q.shape[1], k.shape[1], g)
    out, lse = compiled.attention_forward(q, k, v, **kw)
    ref_out, ref_lse = torch_attention.attention_forward(q, k, v, **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = compiled.attention_backward(dout, q, k, v, ref_out, ref_lse, **kw)
    ref_grads = torch_attention.attention_backward(dout, q, k, v, ref_out, ref_lse, **kw)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol * 5, rtol=rtol * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_oracle(dtype):
    q, k, v, g = _inputs(dtype, hk=1, sq=96, sk=96)
    kw = _masks("causal+docs", 2, 96, 96, g)
    kw["doc_ids"] = kw["doc_ids"][0]  # one tensor: self-attention
    kw["k_positions"] = kw["q_positions"]
    leaves = [t.detach().float().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, **kw)
    ours = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*ours, **kw)
    fin = torch.isfinite(ref_lse)
    w = torch.randn(out.shape, generator=g)
    ((out.float() * w).sum() + lse[fin].sum()).backward()
    ((ref_out * w.double()).sum() + ref_lse[fin].sum()).backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for a, b in zip(ours, leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=tol * 2, rtol=tol * 2)


def test_fully_masked_rows_and_noncontiguous_views():
    q, k, v, g = _inputs(torch.float32, sq=40, sk=40)
    kv = torch.stack([k, v])  # ring attention hands slices of a stacked K/V
    kw = dict(causal=True, q_positions=torch.arange(40), k_positions=torch.arange(40) + 20)
    out, lse = compiled.attention_forward(q[:, ::1], kv[0][:, 5:], kv[1][:, 5:], **{**kw, "k_positions": kw["k_positions"][5:]})
    ref_out, ref_lse = attention_reference(q, k[:, 5:], v[:, 5:], **{**kw, "k_positions": kw["k_positions"][5:]})
    assert torch.isneginf(lse[..., :25]).all() and (out[:, :25] == 0).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse)


def test_gradcheck_float64():
    q, k, v, g = _inputs(torch.float64, b=1, sq=9, sk=13, hq=4, hk=2, d=8)
    kw = _masks("causal+docs", 1, 9, 13, g)
    args = [t.requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        out, lse = torch.ops.seqpar.attention_fwd(q, k, v, True, 0.3, kw["q_positions"], kw["k_positions"],
                                                  *kw["doc_ids"])
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_opcheck_attention():
    q, k, v, g = _inputs(torch.float32, b=1, sq=8, sk=12, hq=4, hk=2, d=16)
    kw = _masks("causal+docs", 1, 8, 12, g)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, kw["q_positions"],
            kw["k_positions"], *kw["doc_ids"])
    torch.library.opcheck(torch.ops.seqpar.attention_fwd.default, args)
    out, lse = torch.ops.seqpar.attention_fwd(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None,
             True, 0.25, kw["q_positions"], kw["k_positions"], *kw["doc_ids"])
    torch.library.opcheck(torch.ops.seqpar.attention_bwd.default, bargs)


def test_clear_errors():
    q, k, v, _ = _inputs(torch.float32, hk=3, hq=4)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.seqpar.attention_fwd(q, k, v, False, 1.0)
    q, k, v, _ = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"q_positions must be shaped \[seq\]"):
        torch.ops.seqpar.attention_fwd(q, k, v, True, 1.0, torch.arange(3), None)


def _ring_worker(dtype_name):
    from seqpar.ops.registry import served_summary
    from seqpar.parallel import ring_attention, shard
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)
    b, s, hq, hk, d = 1, 64, 4, 2, 16
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    docs = (torch.arange(s) // 24)[None]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_reference(*ref_in, causal=True, doc_ids=docs)
    dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    ref_out.backward(dout)
    local = [shard(t.to(dtype), None, dim=1, layout="zigzag").detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=True, layout="zigzag", doc_ids=shard(docs, None, dim=1, layout="zigzag"))
    out.backward(shard(dout.to(dtype), None, dim=1, layout="zigzag"))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    want = [shard(t, None, dim=1, layout="zigzag") for t in [ref_out.detach()] + [t.grad for t in ref_in]]
    for got, ref in zip([out] + [t.grad for t in local], want):
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    return served_summary("cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_attention_with_compiled_kernel(dtype):
    results = run_distributed(_ring_worker, 2, dtype)
    # Packed documents: PyTorch's flash kernel cannot mask them, seqpar's C++ op serves them.
    assert all(r["documents"] == ["seqpar"] and "flash" not in sum(r.values(), []) for r in results), results


def test_build_ext_cli(capsys):
    from seqpar.cli import main
    assert main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert "built: CPU only (ok)" in out and "seqpar: causal-shifted,documents,positions" in out


_PROBE = ("import warnings, torch; warnings.simplefilter('always');"
          "from seqpar.ops import attention_forward, registry;"
          "q = torch.randn(1, 4, 2, 8); docs = torch.tensor([0, 0, 1, 1]);"
          "attention_forward(q, q, q, causal=True, doc_ids=docs); attention_forward(q, q, q, doc_ids=docs);"
          "print(registry.select(q.device, q.dtype, 8, 'documents').name)")


def _probe(tmp_path, **env):
    full = {**os.environ, "SEQPAR_EXT_DIR": str(tmp_path / "ext"), **env}
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=300)


def test_fallbacks_without_a_working_compiler(tmp_path):
    r = _probe(tmp_path, SEQPAR_DISABLE_EXT="1")
    assert r.returncode == 0 and r.stdout.strip() == "torch" and "Warning" not in r.stderr
    r = _probe(tmp_path, CXX="/bin/false")  # a fresh cache dir forces a build that fails
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr
    assert r.stderr.count("compiled ops unavailable") == 1, r.stderr  # one warning, not one per call
    r = _probe(tmp_path, CXX="/bin/false", SEQPAR_REQUIRE_EXT="1")
    assert r.returncode != 0 and "SEQPAR_REQUIRE_EXT=1" in r.stderr
