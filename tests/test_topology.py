"""Mesh groups, the DeepSpeed mpu adapter, shard/unshard and up-front errors, on gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar import SeqparError
from seqpar.parallel import (count_comm, hybrid_attention, init_mesh, ring_attention, shard,
                             ulysses_attention, unshard)

from .distributed import run_distributed


def _group_ranks(group):
    return dist.get_process_group_ranks(group)


def mesh_layouts():
    rank = dist.get_rank()
    found = {}
    for sp, u in [(2, 1), (4, 2), (4, 1), (1, 1)]:
        mesh = init_mesh(sp, u)
        mpu = mesh.mpu()
        found[(sp, u)] = dict(
            sp=_group_ranks(mesh.sp_group), dp=_group_ranks(mesh.dp_group),
            ring=_group_ranks(mesh.ring_group), ulysses=_group_ranks(mesh.ulysses_group),
            sp_rank=mesh.sp_rank, no_dp_group=not hasattr(mpu, "get_data_parallel_group"),
            mpu=(mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank(),
                 mesh.dp_size, mesh.dp_rank, mpu.get_sequence_data_parallel_world_size(),
                 _group_ranks(mpu.get_sequence_parallel_group()) == _group_ranks(mesh.sp_group)),
        )
    # shard / unshard round trip for every layout.
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    mesh = init_mesh(4)
    for layout in ("contiguous", "zigzag", "stripe"):
        part = shard(x, mesh.sp_group, dim=1, layout=layout)
        assert part.shape == (2, 4, 3)
        assert torch.equal(unshard(part, mesh.sp_group, dim=1, layout=layout), x), layout
    return rank, found


def test_mesh_groups_and_mpu():
    results = run_distributed(mesh_layouts, 4)
    for rank, found in results:
        dp_index, sp_index = divmod(rank, 2)
        assert found[(2, 1)]["sp"] == [2 * dp_index, 2 * dp_index + 1]
        assert found[(2, 1)]["dp"] == [sp_index, sp_index + 2]
        assert found[(2, 1)]["mpu"] == (2, sp_index, 2, dp_index, 4, True)
        assert found[(2, 1)]["no_dp_group"]
        # SP 4 = ring 2 x Ulysses 2, Ulysses innermost (neighbouring ranks).
        assert found[(4, 2)]["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert found[(4, 2)]["ring"] == [rank % 2, rank % 2 + 2]
        assert found[(4, 2)]["sp"] == [0, 1, 2, 3] and found[(4, 2)]["sp_rank"] == rank
        assert found[(4, 1)]["mpu"] == (4, rank, 1, 0, 4, True)
        assert found[(1, 1)]["sp"] == [rank] and found[(1, 1)]["dp"] == [0, 1, 2, 3]


def bad_inputs_raise_everywhere():
    """Each bad call must raise SeqparError on this rank without communicating."""
    mesh = init_mesh(2)
    group = mesh.sp_group
    q = torch.randn(1, 3, 4, 16)  # 3 tokens per rank: odd, so zigzag cannot split 6 tokens
    good = torch.randn(1, 4, 4, 16)
    calls = {
        "zigzag length": lambda: ring_attention(q, q, q, group, layout="zigzag"),
        "ulysses heads": lambda: ulysses_attention(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16),
                                                   torch.randn(1, 4, 3, 16), group, layout="contiguous"),
        "dtype": lambda: ring_attention(good, good.double(), good, group),
        "head_dim": lambda: ulysses_attention(good, good[..., :8], good[..., :8], group),
        "doc shape": lambda: ring_attention(good, good, good, group, doc_ids=torch.zeros(5, dtype=torch.long)),
        "sp size": lambda: init_mesh(3),
        "ulysses size": lambda: init_mesh(2, ulysses_size=4),
    }
    messages = {}
    for name, call in calls.items():
        with count_comm() as comm:
            with pytest.raises(SeqparError) as err:
                call()
        assert comm.total_bytes == 0 and not comm.calls, f"{name} communicated before raising"
        messages[name] = str(err.value)
    dist.barrier()  # every rank got here: nobody is stuck in a collective
    return messages


def test_bad_inputs_raise_on_every_rank_before_communicating():
    results = run_distributed(bad_inputs_raise_everywhere, 2, timeout=120)
    assert results[0] == results[1]
    msgs = results[0]
    assert "2 * world_size = 4" in msgs["zigzag length"]
    assert "Ulysses size" in msgs["ulysses heads"]
    assert "one dtype" in msgs["dtype"]
    assert "head_dim" in msgs["head_dim"]
    assert "doc_ids" in msgs["doc shape"]
    assert "not divisible by sp_size 3" in msgs["sp size"]
    assert "ulysses_size 4" in msgs["ulysses size"]


def hybrid_rejects_stripe():
    mesh = init_mesh(4, 2)
    x = torch.randn(1, 4, 4, 16)
    with pytest.raises(SeqparError, match="zigzag"):
        hybrid_attention(x, x, x, mesh, layout="stripe")
    return True


def test_hybrid_rejects_stripe():
    assert all(run_distributed(hybrid_rejects_stripe, 4, timeout=120))
