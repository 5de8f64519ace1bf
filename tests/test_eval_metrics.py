"""pass@k against brute-force subset enumeration; pass@1, majority vote and cons@k on hand-made cases."""
import itertools
import math

import numpy as np
import pytest

from r1jax.eval import metrics


def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert metrics.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert metrics.pass_at_k(10, 0, 1) == 0.0
    assert metrics.pass_at_k(10, 0, 10) == 0.0
    assert metrics.pass_at_k(10, 10, 1) == 1.0
    assert metrics.pass_at_k(10, 7, 4) == 1.0  # k > n - c: every subset holds a correct sample
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(5, 1, 5) == 1.0
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            metrics.pass_at_k(*bad)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows float64; the product form must still agree with exact integer math
    n, c, k = 1000, 3, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_1_mean():
    correct = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    assert metrics.pass_at_1_mean(correct) == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    per_q = [metrics.pass_at_k(4, int(row.sum()), 1) for row in correct]
    assert metrics.pass_at_1_mean(correct) == pytest.approx(np.mean(per_q))
    assert metrics.pass_at_1_mean([[True]]) == 1.0
    with pytest.raises(ValueError, match=r"\[Q, k\]"):
        metrics.pass_at_1_mean([1, 0, 1])


def test_majority_vote_counts_and_normalizes():
    assert metrics.majority_vote(["3", "5", "5", "3", "5"]) == "5"
    strip = lambda s: s.strip().lower()
    assert metrics.majority_vote([" A", "b", "a ", "B", "a"], normalize=strip) == " A"  # first original of the winner
    assert metrics.majority_vote(["x", "y", "y"], normalize=strip) == "y"


def test_majority_vote_ties_go_to_earliest_first_occurrence():
    assert metrics.majority_vote(["7", "9", "9", "7"]) == "7"
    assert metrics.majority_vote(["9", "7", "7", "9"]) == "9"
    assert metrics.majority_vote(["b", "a", "c"]) == "b"  # not alphabetical, not hash order
    assert metrics.majority_vote(["z", "a", "a", "z", "q", "q"]) == "z"


def test_majority_vote_none_abstains():
    assert metrics.majority_vote([None, None, "4"]) == "4"
    assert metrics.majority_vote([None, "4", None, "5", "5"]) == "5"
    assert metrics.majority_vote([None, None]) is None
    with pytest.raises(ValueError, match="no answers"):
        metrics.majority_vote([])


def test_cons_at_k():
    references = ["5", "2", "9", "1"]
    answers = [
        ["5", "3", "5", "1"],      # majority 5: right
        ["1", "2", "1", "2"],      # tie 1/2 -> "1" (first): wrong although pass@1 = 0.5
        ["9", "9", "8", "8", "8"],  # majority 8 over all 5, 9 over the first 4
        [None, None, None, None],  # no answer: wrong
    ]
    correct_fn = lambda q, a: a == references[q]
    assert metrics.cons_at_k(answers, correct_fn) == pytest.approx(1 / 4)
    assert metrics.cons_at_k(answers, correct_fn, k=4) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="question 0"):
        metrics.cons_at_k(answers, correct_fn, k=5)
    spaced = [[" 5", "5 ", "4"]]
    assert metrics.cons_at_k(spaced, lambda q, a: a.strip() == "5", normalize=str.strip) == 1.0
    assert metrics.cons_at_k(spaced, lambda q, a: a == " 5") == 1.0  # without normalize: a 3-way tie, first wins
