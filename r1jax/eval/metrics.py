"""Evaluation math: pass@k, pass@1 over k samples, majority vote, cons@k. Pure Python / numpy.

pass@k (Chen et al. 2021, the unbiased estimator): with n samples of which c are correct,

    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

the product form avoids huge binomials; it is exactly 1 when n − c < k (every k-subset holds a correct
sample). The mean over questions is the benchmark's pass@k.

pass@1 as DeepSeek-R1 reports it: k samples per question (64 for AIME, temperature 0.6, top-p 0.95),
pass@1 = mean correctness over the k samples, then the mean over questions. It equals the mean of the
pass@k estimator at k=1.

cons@k: majority vote over the k answers of a question, then accuracy of the voted answer
(R1 reports cons@64).  Choices the paper does not state:
  - answers are compared after `normalize` (identity by default), e.g. a math canonicaliser;
  - None answers (no answer could be extracted) abstain from the vote; if all abstain the vote is None,
    which counts as wrong;
  - ties go to the answer whose first occurrence comes earliest in the list (sample order), so the
    result is deterministic and does not depend on hashing; the returned answer is that first original
    (un-normalised) string.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_1_mean(correct) -> float:
    """correct: [Q, k] booleans (k samples per question). Mean over samples, then over questions."""
    correct_qk = np.asarray(correct, dtype=np.float64)
    if correct_qk.ndim != 2 or correct_qk.size == 0:
        raise ValueError(f"pass_at_1_mean: expected a non-empty [Q, k] array, got shape {correct_qk.shape}")
    return float(correct_qk.mean(axis=1).mean())


def majority_vote(answers: Sequence[str | None], normalize: Callable[[str], str] | None = None) -> str | None:
    """Most frequent answer after `normalize`; ties -> earliest first occurrence; None answers abstain."""
    if len(answers) == 0:
        raise ValueError("majority_vote: no answers to vote on")
    counts: dict = {}
    first: dict = {}
    for answer in answers:
        if answer is None:
            continue
        key = normalize(answer) if normalize is not None else answer
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, answer)
    if not counts:
        return None
    # dicts keep insertion order = order of first occurrence, and max() returns the first maximum
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def cons_at_k(answers_per_q: Sequence[Sequence[str | None]], correct_fn: Callable[[int, str], bool], *,
              normalize: Callable[[str], str] | None = None, k: int | None = None) -> float:
    """Accuracy of the majority answer: mean over questions q of correct_fn(q, majority_vote(answers[q])).

    correct_fn(q, answer) checks an answer of question q (index into answers_per_q) against its reference.
    k: vote over the first k answers of each question (default: all of them; each needs at least k).
    """
    if len(answers_per_q) == 0:
        raise ValueError("cons_at_k: no questions")
    hits = []
    for q, answers in enumerate(answers_per_q):
        if k is not None:
            if len(answers) < k:
                raise ValueError(f"cons_at_k: question {q} has {len(answers)} answers, fewer than k={k}")
            answers = answers[:k]
        voted = majority_vote(answers, normalize)
        hits.append(voted is not None and bool(correct_fn(q, voted)))
    return float(np.mean(hits))
