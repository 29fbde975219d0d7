"""core's evaluation statistics: pass@k, majority votes, bootstrap intervals (hand values and invariants)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 0, 1, 0.0),
    (4, 1, 1, 0.25),
    (4, 2, 2, 1 - 1 / 6),          # 1 - C(2,2)/C(4,2)
    (4, 1, 4, 1.0),                # C(3,4) = 0: every draw of 4 holds the correct one
    (4, 3, 2, 1.0),                # n - c = 1 < k
    (5, 2, 3, 1 - 1 / 10),         # 1 - C(3,3)/C(5,3)
    (10, 3, 2, 1 - 21 / 45),       # 1 - C(7,2)/C(10,2)
    (10, 0, 10, 0.0),
    (8, 1, 2, 1 - 21 / 28),        # 1 - C(7,2)/C(8,2) = 0.25
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert core.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    tensor = core.pass_at_k(torch.tensor([n]), torch.tensor([c]), k)
    assert tensor.dtype == torch.float64 and tensor.shape == (1,)
    assert float(tensor[0]) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_the_binomial_formula_and_is_monotone(nck):
    n, c, k = nck
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert core.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert float(core.pass_at_k(torch.tensor([n]), torch.tensor([c]), k)[0]) == pytest.approx(exact, abs=1e-9)
    assert core.pass_at_k(n, c, 1) == pytest.approx(c / n)
    if k < n:
        assert core.pass_at_k(n, c, k + 1) >= core.pass_at_k(n, c, k) - 1e-12


def test_pass_at_k_rejects_bad_counts(no_shape_checks):
    with pytest.raises(ValueError, match="k >= 1"):
        core.pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="num_samples"):
        core.pass_at_k(2, 1, 4)
    with pytest.raises(ValueError, match="num_correct"):
        core.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="per problem"):
        core.pass_at_k(torch.tensor([4, 2]), torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="same"):
        core.pass_at_k(torch.tensor([4, 4]), torch.tensor([1]), 1)


@pytest.mark.parametrize(("answers", "winner"), [
    (["3", "5", "5", "3"], 0),      # a 2-2 tie: the answer seen first wins
    (["5", "3", "3", "5"], 0),
    (["5", "3", "3"], 1),           # the majority's first sample
    ([None, "7", None, None], 1),   # no answer does not vote, however many
    ([None, "b", "a", "a"], 2),
    (["a", "b", "c"], 0),           # all different: the first
    ([None, None], None),
    ([], None),
])
def test_majority_vote_ties_go_to_the_first_occurrence(answers, winner):
    assert core.majority_vote(answers) == winner


def test_normalised_answers_vote_together():
    answers = [core.normalize_answer(a) for a in ("0.5", r"\frac12", " 3 ", r"\frac{1}{2}")]
    assert answers[0] == answers[1] == answers[3] != answers[2]
    assert core.majority_vote(answers) == 0


def test_extract_r1_zero_answer_follows_the_reward_function():
    assert core.extract_r1_zero_answer("t </think> <answer> 12 </answer>") == " 12 "
    assert core.extract_r1_zero_answer(r"t </think> <answer> so \boxed{12} </answer>") == "12"
    assert core.extract_r1_zero_answer("t </think><answer> 12 </answer>") is None   # the format needs one space
    assert core.extract_r1_zero_answer(r"t </think> <answer> \boxed </answer>") is None


def test_bootstrap_interval_is_seeded_holds_the_estimate_and_is_degenerate_on_constants():
    values = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    est, lo, hi = core.bootstrap_ci(values, resamples=1000, seed=3)
    assert float(est) == 0.375 and 0.0 <= float(lo) <= 0.375 <= float(hi) <= 1.0 and float(lo) < float(hi)
    again = core.bootstrap_ci(values, resamples=1000, seed=3)
    assert float(again[1]) == float(lo) and float(again[2]) == float(hi)
    est, lo, hi = core.bootstrap_ci(torch.full((5,), 0.3), resamples=1000)
    assert float(lo) == pytest.approx(0.3) and float(hi) == pytest.approx(0.3) and lo <= est <= hi


def test_bootstrap_ratio_estimator_and_columns():
    # Two columns: a mean over problems, and a ratio (e.g. length of the correct samples / their number).
    numerators = torch.tensor([[1.0, 10.0], [0.0, 0.0], [1.0, 30.0]])
    denominators = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 2.0]])
    est, lo, hi = core.bootstrap_ci(numerators, denominators, resamples=1000)
    assert est.shape == (2,)
    assert est.tolist() == pytest.approx([2 / 3, 40 / 3])
    assert torch.all(lo <= est) and torch.all(est <= hi)
    assert 10.0 <= float(lo[1]) and float(hi[1]) <= 15.0   # every resample's ratio lies in [10, 15]
    est, lo, hi = core.bootstrap_ci(torch.zeros(3), torch.zeros(3), resamples=10)
    assert math.isnan(float(est)) and math.isnan(float(lo))


def test_bootstrap_rejects_bad_input(no_shape_checks):
    with pytest.raises(ValueError, match="at least one problem"):
        core.bootstrap_ci(torch.zeros(0))
    with pytest.raises(ValueError, match="shape"):
        core.bootstrap_ci(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="resamples"):
        core.bootstrap_ci(torch.zeros(3), resamples=0)
    with pytest.raises(ValueError, match="level"):
        core.bootstrap_ci(torch.zeros(3), level=1.0)
    with pytest.raises(ValueError, match="same problems"):
        core.paired_bootstrap_ci(torch.zeros(3), torch.zeros(4))


def test_bootstrap_interval_covers_the_truth_on_bernoulli_problems():
    """200 seeded trials: 80 problems drawn from a population of solve rates, 4 Bernoulli samples each; the 95%
    intervals of pass@1 and pass@4 (over problems) must cover the population's values in >= 90% of trials."""
    rates = torch.tensor([0.02, 0.15, 0.4, 0.7, 0.95], dtype=torch.float64)
    truth_pass1 = float(rates.mean())
    truth_pass4 = float((1 - (1 - rates) ** 4).mean())
    g = torch.Generator().manual_seed(0)
    covered = torch.zeros(2)
    trials = 200
    for trial in range(trials):
        p = rates[torch.randint(len(rates), (80,), generator=g)]
        correct = torch.bernoulli(p[:, None].expand(80, 4), generator=g).sum(1).long()
        n = torch.full_like(correct, 4)
        values = torch.stack([core.pass_at_k(n, correct, 1), core.pass_at_k(n, correct, 4)], dim=1)
        _, lo, hi = core.bootstrap_ci(values, resamples=1000, seed=trial)
        covered += ((lo <= torch.tensor([truth_pass1, truth_pass4])) & (torch.tensor([truth_pass1, truth_pass4]) <= hi)).float()
    assert (covered / trials >= 0.90).all(), covered / trials


def test_paired_interval_is_narrower_than_either_run_and_sees_a_small_real_difference():
    g = torch.Generator().manual_seed(1)
    difficulty = torch.rand(300, generator=g, dtype=torch.float64)
    a = (difficulty > 0.5).double()                           # run a solves the easier half
    b = ((difficulty > 0.5) | (difficulty < 0.08)).double()   # run b also solves a few more
    diff, lo, hi = core.paired_bootstrap_ci(a, b, resamples=2000)
    assert float(diff) == pytest.approx(float(b.mean() - a.mean()))
    assert 0 < float(lo) <= float(diff) <= float(hi)          # excludes 0
    _, a_lo, a_hi = core.bootstrap_ci(a, resamples=2000)
    assert float(hi - lo) < float(a_hi - a_lo) / 2
    same = core.paired_bootstrap_ci(a, a, resamples=100)
    assert [float(x) for x in same] == [0.0, 0.0, 0.0]
