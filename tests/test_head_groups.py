"""Which heads each attention head group holds, and which numbers of groups are refused
(`seqpar.parallel.head_groups`; the tiled layer runs them: tests/test_tiled_layer.py)."""

from __future__ import annotations

import pytest

from seqpar import SeqparError
from seqpar.parallel.head_groups import check_head_groups, head_groups


def test_groups_of_whole_kv_heads_and_of_parts_of_one():
    whole = head_groups(32, 8, 4)  # Llama-3-8B: two K/V heads and their eight query heads each
    assert [(g.q_heads, g.kv_heads) for g in whole] == [
        (range(8 * i, 8 * i + 8), range(2 * i, 2 * i + 2)) for i in range(4)]
    parts = head_groups(4, 2, 4)  # one query head each: query head i reads K/V head i // 2
    assert [(g.q_heads, g.kv_heads) for g in parts] == [
        (range(i, i + 1), range(i // 2, i // 2 + 1)) for i in range(4)]
    assert [g.index for g in parts] == [0, 1, 2, 3]


@pytest.mark.parametrize("heads,kv_heads,groups,ulysses,words", [
    (4, 2, 3, 1, ["3 head groups", "choose one of [1, 2, 4]"]),
    (6, 4, 3, 1, ["choose one of [1, 2]"]),  # 3 divides the query heads, not the K/V heads
    (32, 8, 8, 8, ["Ulysses size 8", "fewer head groups"]),  # 4 query heads per group over 8 ranks
    (4, 1, 0, 1, [">= 1"]),
])
def test_groups_that_do_not_fit_are_refused_with_the_fix(heads, kv_heads, groups, ulysses, words):
    with pytest.raises(SeqparError) as err:
        check_head_groups(heads, kv_heads, groups, ulysses)
    assert all(w in str(err.value) for w in words), str(err.value)
