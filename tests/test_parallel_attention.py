"""Ring (3 layouts), Ulysses and hybrid attention against the float64 oracle, on real
multi-process gloo (and nccl when 2+ GPUs are visible).

Each world size is one spawn running many cases (process start-up is the cost). In every
case each rank checks its output and dq/dk/dv shards against `attention_reference` on the
unsharded tensors, and counts the communication of one forward and one backward against
the algorithm's definition (`seqpar.parallel.volume`): a change that adds traffic fails.
"""

from __future__ import annotations

import ast
import itertools
import pathlib
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from seqpar.errors import SeqparError
from seqpar.ops import attention_reference
from seqpar.parallel import (count_comm, hybrid_attention, init_mesh, ring_attention, shard,
                             ulysses_attention, unshard)
from seqpar.parallel.volume import expected_comm

from .distributed import backends_to_test, device_for, run_distributed

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    algo: str  # ring | ulysses | hybrid
    layout: str
    causal: bool
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    docs: bool
    ulysses_size: int = 1
    batch: int = 2
    chunks_per_rank: int = 3  # sequence = 2 * W * chunks_per_rank tokens
    kv_heads_per_pass: int | None = None  # ring: None = as the shard's size decides (one pass here)

    def __str__(self):
        u = f" U={self.ulysses_size}" if self.algo == "hybrid" else ""
        passes = f" kv/pass={self.kv_heads_per_pass}" if self.kv_heads_per_pass else ""
        return (f"{self.algo}{u} {self.layout} causal={self.causal} heads={self.q_heads}/{self.kv_heads} "
                f"d={self.head_dim} {str(self.dtype)[6:]} docs={self.docs}{passes}")


def doc_ids_for(batch: int, seq_len: int) -> torch.Tensor:
    """Packed documents whose boundaries fall inside shards and across shard edges."""
    rows = []
    for row in range(batch):
        cuts = sorted({3 + row, seq_len // 3 + 1, (2 * seq_len) // 3 - 1 - row})
        ids = torch.zeros(seq_len, dtype=torch.int64)
        for cut in cuts:
            ids[cut:] += 1
        rows.append(ids)
    return torch.stack(rows)


def cases_for(world: int) -> list[Case]:
    q_heads = 12 if world == 3 else 8
    rotation = itertools.cycle([(1, 64), (2, 80), (4, 64), (1, 80), (2, 64), (4, 80)])
    algos = [("ring", "contiguous", 1), ("ring", "zigzag", 1), ("ring", "stripe", 1),
             ("ulysses", "zigzag", 1), ("ulysses", "contiguous", 1)]
    if world == 4:
        algos += [("hybrid", "zigzag", 2), ("hybrid", "contiguous", 2)]
    cases = []
    for (algo, layout, u), causal, dtype, docs in itertools.product(
            algos, (False, True), (torch.float32, torch.bfloat16), (False, True)):
        ratio, head_dim = next(rotation)
        cases.append(Case(algo, layout, causal, q_heads, q_heads // ratio, head_dim, dtype, docs, u))
    # The ring in passes over K/V heads: one head per pass, and two of four.
    cases += [Case("ring", "zigzag", True, q_heads, 4, 64, torch.float32, True, kv_heads_per_pass=1),
              Case("ring", "stripe", False, q_heads, 4, 80, torch.bfloat16, False, kv_heads_per_pass=2)]
    return cases


def cases_for_eight() -> list[Case]:
    """World size 8: one case per algorithm, the most demanding settings."""
    return [
        Case("ring", "zigzag", True, 8, 2, 64, torch.float32, True, chunks_per_rank=2),
        Case("ring", "stripe", True, 8, 8, 80, torch.bfloat16, False, chunks_per_rank=2),
        Case("ulysses", "zigzag", True, 8, 2, 64, torch.float32, True, chunks_per_rank=2),
        Case("hybrid", "zigzag", True, 8, 4, 64, torch.float32, True, ulysses_size=2, chunks_per_rank=2),
        Case("hybrid", "contiguous", False, 8, 2, 80, torch.bfloat16, False, ulysses_size=4, chunks_per_rank=2),
    ]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def run_case(case: Case, mesh, device) -> list[str]:
    world = mesh.sp_size
    seq_len = 2 * world * case.chunks_per_rank
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    shape_q = (case.batch, seq_len, case.q_heads, case.head_dim)
    shape_kv = (case.batch, seq_len, case.kv_heads, case.head_dim)
    # Inputs are rounded to the test dtype first, so the oracle sees exactly what the ranks see.
    q, k, v = (torch.randn(s, generator=gen).to(case.dtype).double() for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, generator=gen).to(case.dtype).double()
    docs = doc_ids_for(case.batch, seq_len) if case.docs else None

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_reference(q, k, v, causal=case.causal, doc_ids=docs)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad_out)

    group = mesh.sp_group
    local = [shard(t.detach(), group, 1, case.layout).to(device, case.dtype).requires_grad_() for t in (q, k, v)]
    local_docs = None if docs is None else shard(docs, group, 1, case.layout).to(device)
    kw = dict(causal=case.causal, layout=case.layout, doc_ids=local_docs)
    with count_comm() as fwd_comm:
        if case.algo == "ring":
            out = ring_attention(*local, group, kv_heads_per_pass=case.kv_heads_per_pass, **kw)
        elif case.algo == "ulysses":
            out = ulysses_attention(*local, group, **kw)
        else:
            out = hybrid_attention(*local, mesh, **kw)
    local_grad_out = shard(grad_out, group, 1, case.layout).to(device, case.dtype)
    with count_comm() as bwd_comm:
        grads = torch.autograd.grad(out, local, local_grad_out)

    failures = []
    names = ("out", "dq", "dk", "dv")
    for name, mine, ref in zip(names, (out, *grads), (ref_out, *ref_grads)):
        if mine.dtype != case.dtype or mine.shape != local[0 if name in ("out", "dq") else 1].shape:
            failures.append(f"{case}: {name} has dtype {mine.dtype} shape {tuple(mine.shape)}")
            continue
        err = relative_error(unshard(mine.detach().double(), group, 1, case.layout).cpu(), ref.detach())
        if not err < TOLERANCE[case.dtype]:
            failures.append(f"{case}: {name} relative error {err:.2e} > {TOLERANCE[case.dtype]:.0e}")

    want_fwd, want_bwd = expected_comm(
        case.algo, seq_len=seq_len, batch=case.batch, q_heads=case.q_heads, kv_heads=case.kv_heads,
        head_dim=case.head_dim, elem_bytes=torch.empty((), dtype=case.dtype).element_size(),
        sp_size=world, ulysses_size=case.ulysses_size, docs=case.docs,
        kv_heads_per_pass=case.kv_heads_per_pass)
    for phase, got, want in (("forward", fwd_comm, want_fwd), ("backward", bwd_comm, want_bwd)):
        if dict(got.calls) != want.calls or dict(got.bytes_sent) != want.bytes_sent:
            failures.append(f"{case}: {phase} communication {dict(got.calls)} {dict(got.bytes_sent)} "
                            f"!= expected {want.calls} {want.bytes_sent}")
    return failures


def run_cases(cases: list[Case], backend: str) -> list[str]:
    device = device_for(backend)
    world = dist.get_world_size()
    meshes = {}
    failures = []
    for case in cases:
        u = case.ulysses_size if case.algo == "hybrid" else 1
        if u not in meshes:
            meshes[u] = init_mesh(world, u)
        failures += run_case(case, meshes[u], device)
    return failures


def _assert_no_failures(results, cases):
    failures = sorted({f for rank_failures in results for f in rank_failures})
    assert not failures, f"{len(failures)} failing checks over {len(cases)} cases:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_device_attention(world, backend):
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    cases = cases_for(world)
    _assert_no_failures(run_distributed(run_cases, world, cases, backend, timeout=900, backend=backend), cases)


@pytest.mark.parametrize("backend", backends_to_test())
def test_matches_single_device_attention_world_8(backend):
    if backend == "nccl" and torch.cuda.device_count() < 8:
        pytest.skip("needs 8 GPUs")
    cases = cases_for_eight()
    _assert_no_failures(run_distributed(run_cases, 8, cases, backend, timeout=900, backend=backend), cases)


def run_cases_with_kernels(cases: list[Case], backend: str, kernels: list[str]) -> list[str]:
    """The same cases with the local kernel order forced, one kernel after the other."""
    from seqpar.ops import registry, set_attention_kernel
    failures = []
    for kernel in kernels:
        set_attention_kernel(kernel)
        registry.reset()
        failures += [f"kernel={kernel}: {f}" for f in run_cases(cases, backend)]
        served = sum(registry.served_summary().values(), [])
        if kernel not in served:  # the forced kernel must really have served blocks
            failures.append(f"kernel={kernel}: served nothing; blocks went to {served}")
    set_attention_kernel(None)
    return failures


def test_matches_single_device_attention_forced_kernels():
    """`auto` is the matrix above; here each other CPU kernel serves every block it can."""
    cases = [c for c in cases_for(4) if c.dtype == torch.float32]
    results = run_distributed(run_cases_with_kernels, 4, cases, "gloo", ["seqpar", "torch"], timeout=900)
    _assert_no_failures(results, cases)


def test_only_comm_communicates():
    """Every collective of the attention algorithms, layouts and the sharded loss goes
    through `seqpar.parallel.comm` (so `count_comm` sees it): no other module of theirs
    calls a torch.distributed collective or point-to-point op."""
    root = pathlib.Path(__file__).resolve().parents[1] / "seqpar"
    ops = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "send", "recv", "isend",
           "irecv", "batch_isend_irecv", "all_to_all", "all_to_all_single", "reduce_scatter", "gather",
           "scatter", "reduce"}
    files = [p for p in sorted((root / "parallel").glob("*.py")) + sorted((root / "ops").glob("*.py"))
             if p.name not in ("comm.py", "mesh.py", "spawn.py")] + [root / "model" / "loss.py"]
    calls = [f"{p.relative_to(root)}:{node.lineno} dist.{node.func.attr}"
             for p in files for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist" and node.func.attr in ops]
    assert calls == []


def _bad_pass_size(kv_heads_per_pass: int) -> str:
    mesh = init_mesh(dist.get_world_size(), 1)
    q, k, v = (torch.randn(1, 4, h, 16) for h in (8, 4, 4))
    try:
        ring_attention(q, k, v, mesh.sp_group, kv_heads_per_pass=kv_heads_per_pass)
    except SeqparError as e:
        return str(e)
    return "no error"


def test_ring_refuses_a_pass_size_that_does_not_divide_the_kv_heads():
    """Refused on every rank before anything is sent (a rank that went on would hang)."""
    for got in run_distributed(_bad_pass_size, 2, 3, timeout=120):
        assert "kv_heads_per_pass=3 must divide the 4 K/V heads" in got
