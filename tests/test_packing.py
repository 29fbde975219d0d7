"""Token-budget packing (shell.packing): every row once, the budget, the fewest microbatches, rank multiples."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shell.packing import pack_by_tokens, padded_tokens

lengths_st = st.lists(st.integers(min_value=0, max_value=300), max_size=40)
budget_st = st.integers(min_value=1, max_value=1200)


@given(lengths_st, budget_st, st.integers(min_value=1, max_value=8))
def test_every_row_once_within_budget_and_a_multiple_of_ranks(lengths, budget, ranks):
    bins = pack_by_tokens(lengths, budget, multiple_of=ranks)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert len(bins) % ranks == 0
    for b in bins:
        assert len(b) <= 1 or padded_tokens(lengths, b) <= budget  # a row over budget goes alone
    if any(not b for b in bins):  # empty work only when no microbatch could be split further
        assert all(len(b) <= 1 for b in bins)


@given(lengths_st, budget_st)
def test_a_row_over_the_budget_goes_alone_and_the_rest_stay_within(lengths, budget):
    bins = pack_by_tokens(lengths, budget)
    for b in bins:
        if any(lengths[i] > budget for i in b):
            assert len(b) == 1


def _fewest(lengths: tuple[int, ...], budget: int) -> int:
    """The fewest microbatches of any packing (exhaustive search over subsets)."""
    n = len(lengths)

    def ok(mask: int) -> bool:
        rows = [i for i in range(n) if mask >> i & 1]
        return len(rows) == 1 or padded_tokens(lengths, rows) <= budget

    @functools.cache
    def best(left: int) -> int:
        if not left:
            return 0
        low = left & -left  # the lowest row left must go somewhere: try every microbatch holding it
        rest = left ^ low
        out, sub = n, rest
        while True:
            if ok(sub | low):
                out = min(out, 1 + best(rest ^ sub))
            if not sub:
                return out
            sub = (sub - 1) & rest

    return best((1 << n) - 1)


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=8), st.integers(min_value=1, max_value=150))
def test_first_fit_decreasing_needs_the_fewest_microbatches(lengths, budget):
    assert len(pack_by_tokens(lengths, budget)) == _fewest(tuple(lengths), budget)


def test_hand_worked():
    # sorted: 100 (row 1), 60 (3), 50 (0), 40 (2), 10 (4); budget 200: [100, 60] = 200, [50, 40, 10] = 150
    assert pack_by_tokens([50, 100, 40, 60, 10], 200) == [[1, 3], [0, 2, 4]]
    # two ranks: 2 microbatches already
    assert pack_by_tokens([50, 100, 40, 60, 10], 200, multiple_of=2) == [[1, 3], [0, 2, 4]]
    # three ranks: the most padded (200 tokens) is split
    assert pack_by_tokens([50, 100, 40, 60, 10], 200, multiple_of=3) == [[1], [3], [0, 2, 4]]
    # a row of 300 over a budget of 200 goes alone
    assert pack_by_tokens([300, 20, 20], 200) == [[0], [1, 2]]
    # one row each and an odd count on two ranks: an empty microbatch pads
    assert pack_by_tokens([150, 150, 150], 200, multiple_of=2) == [[0], [1], [2], []]
    assert pack_by_tokens([], 10, multiple_of=2) == []


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=10, multiple_of=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        pack_by_tokens([1, 2], **kwargs)
    with pytest.raises(ValueError, match="lengths"):
        pack_by_tokens([1, -2], 10)
