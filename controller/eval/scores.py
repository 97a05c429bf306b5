"""Held-out evaluation scores over P prompts × N samples each (pure, NumPy, on the host).

- pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code", eq. 1): the
  chance that at least one of k samples drawn without replacement from the N is correct,
  estimated without bias from the c correct ones.
- mean@k: the mean reward of k samples.
- maj@k (Wang et al., 2023, self-consistency): the majority answer of k samples is correct.

Arrays are [prompts, N]: row p holds the N samples of prompt p, in the order they were drawn.
mean@k and maj@k read the first k of each row, so one evaluation with N ≥ k samples reports
what an evaluation with k samples would.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with n samples of which c are correct.

        pass@k = 1 − C(n−c, k) / C(n, k) = 1 − ∏_{i=n−c+1}^{n} (1 − k/i)

    The product form (Chen et al., 2021, Fig. 3) avoids the huge binomials; when n − c < k
    every draw of k holds a correct sample and pass@k = 1.

    Raises:
        TypeError: an argument is not an integer.
        ValueError: unless n ≥ k ≥ 1 and 0 ≤ c ≤ n; the message names the argument.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if k < 1:
        raise ValueError(f"pass_at_k: k={k}: must be >= 1")
    if n < k:
        raise ValueError(f"pass_at_k: n={n}: must be >= k={k} (draw at least k samples)")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c}: must be in [0, n={n}]")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _check_PxN(values_PxN: ArrayLike, k: int, what: str) -> np.ndarray:
    v = np.asarray(values_PxN)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"{what} must be [prompts, N] with at least one prompt, "
                         f"got shape {v.shape}")
    if not 1 <= k <= v.shape[1]:
        raise ValueError(f"k={k}: must be in [1, N={v.shape[1]}] (N = samples per prompt)")
    return v


def mean_pass_at_k(correct_PxN: ArrayLike, k: int) -> float:
    """Mean over prompts of `pass_at_k(N, c_p, k)`, c_p = number of correct samples of prompt p.

    Args:
        correct_PxN: whether each sample is correct; bools, or numbers that are all 0 or 1.
        k: samples per attempt, 1 ≤ k ≤ N.
    """
    correct = _check_PxN(correct_PxN, k, "correct")
    if correct.dtype != np.bool_:
        if not is_binary(correct):
            raise ValueError("correct must hold bools or 0/1 values, got other values")
        correct = correct == 1
    n = correct.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)]))


def mean_at_k(rewards_PxN: ArrayLike, k: int) -> float:
    """mean@k = (1/P) Σ_p (1/k) Σ_{i<k} r_{p,i}: the mean reward of each prompt's first k samples.

    Every k has the same expectation E[r]; averaging all N would estimate it with less variance.
    Reading the first k instead makes mean@k and maj@k score the same samples, and an evaluation
    with N > k report what one with N = k would. For the all-samples mean pass k = N.
    """
    r = _check_PxN(rewards_PxN, k, "rewards").astype(np.float64)
    return float(r[:, :k].mean(axis=1).mean())


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]],
             k: int) -> float:
    """maj@k: the fraction of prompts whose majority answer over their first k samples is correct.

    For prompt p the winner is the most common answer among a_{p,0..k−1}, None (no answer)
    aside; among equally common answers the one that appears first wins. The prompt counts
    1 when some sample i < k with a_{p,i} = winner is correct, and 0 when it is not or when all
    k answers are None. maj@k = (1/P) Σ_p that count.

    Args:
        answers: per prompt, each sample's extracted answer (`rewards.answers.extract_answer`).
        correct: per prompt, whether each sample is correct; the same shape as `answers`.
        k: samples voting, 1 ≤ k ≤ the samples of every prompt.
    """
    if len(answers) == 0 or len(answers) != len(correct):
        raise ValueError(f"answers and correct must hold the same number (>= 1) of prompts, "
                         f"got {len(answers)} and {len(correct)}")
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    hits = 0
    for p, (answers_N, correct_N) in enumerate(zip(answers, correct, strict=True)):
        if len(answers_N) != len(correct_N):
            raise ValueError(f"prompt {p}: {len(answers_N)} answers but {len(correct_N)} "
                             f"correct flags")
        if len(answers_N) < k:
            raise ValueError(f"k={k}: prompt {p} has only {len(answers_N)} samples")
        votes = collections.Counter(a for a in answers_N[:k] if a is not None)
        if not votes:
            continue
        # most_common orders equal counts by first appearance, which is the tie-break.
        winner = votes.most_common(1)[0][0]
        hits += any(bool(ok) for a, ok in zip(answers_N[:k], correct_N[:k], strict=True)
                    if a == winner)
    return hits / len(answers)


def is_binary(values: ArrayLike) -> bool:
    """True when there is at least one value and every value is 0 or 1 (so accuracy applies)."""
    v = np.asarray(values)
    return bool(v.size) and bool(np.all((v == 0) | (v == 1)))


def summarize(rewards_PxN: ArrayLike, k: int,
              answers: Sequence[Sequence[str | None]] | None = None) -> dict[str, float]:
    """The scores that apply to one reward: `mean@k` always; when every reward is 0 or 1 (a
    reward of 1 is a correct sample) also `accuracy` (the mean over all N samples, which is
    pass@1), `pass@k`, and, given each sample's extracted answer, `maj@k`. Keys carry the
    number: {"mean@4": …, "accuracy": …, "pass@4": …, "maj@4": …}.
    """
    r = _check_PxN(rewards_PxN, k, "rewards").astype(np.float64)
    out = {f"mean@{k}": mean_at_k(r, k)}
    if is_binary(r):
        correct = r == 1
        out["accuracy"] = float(correct.mean())
        out[f"pass@{k}"] = mean_pass_at_k(correct, k)
        if answers is not None:
            out[f"maj@{k}"] = maj_at_k(answers, correct.tolist(), k)
    return out
