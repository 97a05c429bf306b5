"""Evaluation scores (controller/eval/scores.py) against hand-worked numbers and the closed form."""

import itertools
import math

import numpy as np
import pytest

from controller.eval.scores import (
    is_binary,
    maj_at_k,
    mean_at_k,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 1, 0.4),             # 1 − C(3,1)/C(5,1) = 1 − 3/5
    (5, 2, 2, 0.7),             # 1 − C(3,2)/C(5,2) = 1 − 3/10
    (4, 1, 2, 0.5),             # 1 − C(3,2)/C(4,2) = 1 − 3/6
    (10, 3, 3, 1 - 35 / 120),   # 1 − C(7,3)/C(10,3) = 1 − 35/120
    (5, 0, 3, 0.0),             # no correct sample
    (5, 5, 3, 1.0),             # all correct
    (5, 3, 3, 1.0),             # n − c = 2 < k: every 3 of the 5 hold a correct one
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_matches_closed_form_on_a_grid():
    for n in range(1, 13):
        for k, c in itertools.product(range(1, n + 1), range(n + 1)):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-12), (n, c, k)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not. 1 − C(990,10)/C(1000,10)
    # as an exact fraction, then one division.
    exact = 1 - math.comb(990, 10) / math.comb(1000, 10)
    assert pass_at_k(1000, 10, 10) == pytest.approx(exact, rel=1e-12)
    assert 0.0 < pass_at_k(1000, 1, 500) < 1.0
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, rel=1e-12)  # 1 − C(999,500)/C(1000,500)


@pytest.mark.parametrize(("n", "c", "k", "name"), [
    (5, 2, 0, "k=0"),
    (5, 2, -1, "k=-1"),
    (2, 1, 3, "n=2"),
    (5, 6, 1, "c=6"),
    (5, -1, 1, "c=-1"),
])
def test_pass_at_k_rejects_bad_arguments(n, c, k, name):
    with pytest.raises(ValueError, match=name):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


def test_mean_pass_at_k_averages_prompts():
    correct = np.array([[1, 1, 0, 0, 0],    # pass@2 = 0.7
                        [0, 0, 0, 0, 0],    # 0
                        [1, 0, 1, 0, 1]],   # n − c = 2: pass@2 = 1 − C(2,2)/C(5,2) = 0.9
                       dtype=bool)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.7 + 0.0 + 0.9) / 3, rel=1e-12)
    # 0/1 numbers mean the same; pass@1 is the plain accuracy 5/15.
    assert mean_pass_at_k(correct.astype(float), 1) == pytest.approx(5 / 15, rel=1e-12)


@pytest.mark.parametrize(("values", "k", "match"), [
    ([[True, False]], 3, "k=3"),
    ([[True, False]], 0, "k=0"),
    ([True, False], 1, "shape"),
    (np.zeros((0, 4), dtype=bool), 1, "shape"),
    ([[0.5, 1.0]], 1, "0/1"),
])
def test_mean_pass_at_k_rejects_bad_arguments(values, k, match):
    with pytest.raises(ValueError, match=match):
        mean_pass_at_k(values, k)


# ---------------------------------------------------------------------------------------------
# mean@k


def test_mean_at_k_reads_the_first_k_samples():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0],
                        [0.5, 0.5, 1.0, 1.0]])
    # k=2: prompt means 0.5 and 0.5 -> 0.5. k=4: 0.25 and 0.75 -> 0.5. k=1: 1.0 and 0.5 -> 0.75.
    assert mean_at_k(rewards, 2) == pytest.approx(0.5, rel=1e-12)
    assert mean_at_k(rewards, 1) == pytest.approx(0.75, rel=1e-12)
    assert mean_at_k(rewards, 3) == pytest.approx((1 / 3 + 2 / 3) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="k=5"):
        mean_at_k(rewards, 5)


# ---------------------------------------------------------------------------------------------
# maj@k


def test_maj_at_k_hand_worked():
    answers = [
        ["4", "4", "5", None],    # majority "4", a "4" is correct -> 1
        ["7", "7", "3", "7"],     # wrong majority "7", the minority "3" is correct -> 0
        [None, None, None, None],  # no answer at all -> 0, even if a flag says correct
        [None, None, "2", "9"],   # None never wins: "2" (first of the 1-1 tie) is correct -> 1
    ]
    correct = [
        [True, True, False, False],
        [False, False, True, False],
        [True, False, False, False],
        [False, False, True, False],
    ]
    assert maj_at_k(answers, correct, 4) == pytest.approx(2 / 4, rel=1e-12)


def test_maj_at_k_breaks_ties_by_first_appearance():
    # "b" and "a" both appear twice; "b" comes first, and only "a" is correct.
    assert maj_at_k([["b", "a", "a", "b"]], [[False, True, True, False]], 4) == 0.0
    assert maj_at_k([["a", "b", "b", "a"]], [[True, False, False, True]], 4) == 1.0


def test_maj_at_k_votes_with_the_first_k_samples():
    answers = [["1", "2", "2", "2"]]
    correct = [[True, False, False, False]]
    assert maj_at_k(answers, correct, 1) == 1.0   # only "1" votes
    assert maj_at_k(answers, correct, 2) == 1.0   # 1-1 tie, "1" first
    assert maj_at_k(answers, correct, 3) == 0.0   # "2" wins 2-1
    # A correct sample past k does not count: "2" wins among the first 3, only the 4th is right.
    assert maj_at_k([["2", "2", "1", "2"]], [[False, False, True, True]], 3) == 0.0


def test_maj_at_k_is_correct_when_any_winning_sample_is():
    # Two samples say "5"; only the second is graded correct (e.g. a format reward differs).
    assert maj_at_k([["5", "5", "6"]], [[False, True, False]], 3) == 1.0


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="same number"):
        maj_at_k([["1"]], [[True], [False]], 1)
    with pytest.raises(ValueError, match="same number"):
        maj_at_k([], [], 1)
    with pytest.raises(ValueError, match="prompt 1: 2 answers but 1"):
        maj_at_k([["1"], ["1", "2"]], [[True], [True]], 1)
    with pytest.raises(ValueError, match="k=3: prompt 0 has only 2"):
        maj_at_k([["1", "2"]], [[True, False]], 3)
    with pytest.raises(ValueError, match="k=0"):
        maj_at_k([["1", "2"]], [[True, False]], 0)


# ---------------------------------------------------------------------------------------------
# is_binary and summarize


@pytest.mark.parametrize(("values", "expected"), [
    ([0.0, 1.0, 1.0], True),
    ([[1, 1], [0, 0]], True),
    ([True, False], True),
    ([0.0, 0.9], False),
    ([0.0, -1.0], False),
    ([1.0, float("nan")], False),
    ([], False),
])
def test_is_binary(values, expected):
    assert is_binary(values) is expected


def test_summarize_binary_rewards():
    rewards = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    answers = [["3", "4", "4"], ["1", None, None]]
    out = summarize(rewards, 2, answers)
    # mean@2: (0.5 + 0) / 2; accuracy 1/6; pass@2: (1 − C(2,2)/C(3,2) + 0) / 2 = (2/3) / 2;
    # maj@2: prompt 0 ties 1-1 and "3" (first, correct) wins; prompt 1's "1" is wrong.
    assert out == pytest.approx({"mean@2": 0.25, "accuracy": 1 / 6, "pass@2": 1 / 3,
                                 "maj@2": 0.5}, rel=1e-12)


def test_summarize_graded_rewards_only_report_the_mean():
    out = summarize([[0.5, 1.0], [0.0, 0.25]], 2, [["1", "1"], ["2", "2"]])
    assert out == pytest.approx({"mean@2": 0.4375}, rel=1e-12)
