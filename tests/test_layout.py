"""Layouts and the causal block plan, single process (no communication needed)."""

from __future__ import annotations

import doctest

import pytest
import torch

from seqpar import SeqparError
from seqpar.parallel import LAYOUTS, check_layout, ring, shard_chunks, shard_positions
from seqpar.parallel.ring import CAUSAL, FULL, BlockCall, Rows, plan_blocks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_every_token_on_exactly_one_rank(layout, world):
    seq_len = 2 * world * 5
    owned = torch.cat([shard_positions(seq_len, r, world, layout) for r in range(world)])
    assert torch.equal(owned.sort().values, torch.arange(seq_len))
    for r in range(world):
        pos = shard_positions(seq_len, r, world, layout)
        assert len(pos) == seq_len // world and torch.all(pos[1:] > pos[:-1])


def test_layout_definitions():
    assert shard_positions(16, 1, 4, "contiguous").tolist() == [4, 5, 6, 7]
    assert shard_positions(16, 1, 4, "zigzag").tolist() == [2, 3, 12, 13]  # chunks 1 and 6 of 8
    assert shard_positions(16, 1, 4, "stripe").tolist() == [1, 5, 9, 13]


@pytest.mark.parametrize("seq_len,world,layout,match", [
    (30, 4, "zigzag", "2 \\* world_size = 8.*e.g. 32"),
    (30, 4, "contiguous", "world_size = 4.*e.g. 32"),
    (16, 4, "diagonal", "unknown layout"),
])
def test_bad_layouts_name_the_fix(seq_len, world, layout, match):
    with pytest.raises(SeqparError, match=match):
        check_layout(seq_len, world, layout)


def causal_work(seq_len, world, layout):
    """Score-matrix entries each rank computes at each ring step, from the block plan."""
    chunks = [shard_chunks(seq_len, r, world, layout) for r in range(world)]
    work = torch.zeros(world, world, dtype=torch.long)
    for rank in range(world):
        for step in range(world):
            src = (rank - step) % world
            for call in plan_blocks(chunks[rank], chunks[src], causal=True):
                work[rank, step] += len(call.q_rows) * len(call.k_rows)
    return work


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_at_every_step(world):
    work = causal_work(2 * world * 4, world, "zigzag")
    assert torch.all(work == work[0:1])  # every rank the same work at each step
    # ...and computes half of the full square at every off-diagonal step (masked half skipped).
    s = 2 * world * 4 // world
    assert torch.all(work[:, 1:] == s * s // 2)


def test_contiguous_skips_future_blocks():
    world, seq_len = 4, 32
    chunks = [shard_chunks(seq_len, r, world, "contiguous") for r in range(world)]
    for rank in range(world):
        for src in range(world):
            tasks = plan_blocks(chunks[rank], chunks[src], causal=True)
            if src > rank:
                assert tasks == []  # entirely in the future: no kernel call at all
            elif src < rank:
                assert [t.masked for t in tasks] == [False]  # entirely in the past: no mask
            else:
                assert [t.masked for t in tasks] == [True]


def test_blocks_without_shared_documents_are_skipped():
    chunks = [shard_chunks(8, r, 2, "contiguous") for r in range(2)]
    q_doc, k_doc = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0]])
    assert plan_blocks(chunks[1], chunks[0], causal=True, q_doc=q_doc, k_doc=k_doc) == []
    assert plan_blocks(chunks[1], chunks[0], causal=True, q_doc=q_doc, k_doc=q_doc) != []


def test_ring_docstring_example_is_what_plan_blocks_returns():
    # The worked W=2 zigzag example in ring.py's module docstring, run as a doctest.
    result = doctest.testmod(ring, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_zigzag_rank1_of_2_plan():
    rank0, rank1 = shard_chunks(8, 0, 2), shard_chunks(8, 1, 2)
    lo, hi = rank1  # tokens 2-3 (rows 0-1), tokens 4-5 (rows 2-3)
    # step 0, own block: the diagonal of 2-3 masked, 2-3 x 4-5 skipped, 4-5 x all masked
    assert plan_blocks(rank1, rank1, causal=True) == [
        BlockCall(Rows((lo,)), Rows((lo,)), CAUSAL), BlockCall(Rows((hi,)), Rows(tuple(rank1)), CAUSAL)]
    # step 1, rank 0's block: keys 0-1 in full for both query runs, keys 6-7 skipped
    assert plan_blocks(rank1, rank0, causal=True) == [
        BlockCall(Rows((lo,)), Rows((rank0[0],)), FULL), BlockCall(Rows((hi,)), Rows((rank0[0],)), FULL)]
    # without a causal mask every query sees every key: one call over the whole block
    assert plan_blocks(rank1, rank0, causal=False) == [BlockCall(Rows(tuple(rank1)), Rows(tuple(rank0)), FULL)]
