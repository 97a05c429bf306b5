"""Answer extraction for majority voting (rewards/answers.py)."""

import pytest

from rewards.answers import HAS_ANSWERS, extract_answer
from rewards.builtin import gsm8k


@pytest.mark.parametrize("completion", [
    "1000",
    "1,000",
    "1000.0",
    "$1000",
    "$1,000.00",
    "So she pays 20 * 50 = 1000. #### 1000",
    "<think>20 * 50</think><answer>1,000</answer>",
    "The answer is $1000.",
    "\\boxed{1000}",
])
def test_gsm8k_writings_of_one_value_agree(completion):
    assert extract_answer("gsm8k", completion) == "1000"


@pytest.mark.parametrize(("completion", "expected"), [
    ("0.5", "1/2"),
    ("1/2", "1/2"),
    ("-3", "-3"),
    ("12%", "12"),
    ("2.25", "9/4"),
])
def test_gsm8k_exact_values(completion, expected):
    assert extract_answer("gsm8k", completion) == expected


def test_gsm8k_different_values_differ():
    values = {extract_answer("gsm8k", c) for c in
              ["1000", "1001", "100", "1,450,001", "1,450,000", "-1000", "1000.5"]}
    assert len(values) == 7


def test_gsm8k_reads_the_final_answer_not_the_last_number():
    # The tagged answer is 18; the number after it is not the answer.
    assert extract_answer("gsm8k", "<answer>18</answer> (I checked 3 times)") == "18"
    assert extract_answer("gsm8k", "3 + 4 = 7, so the answer is 8") == "8"


def test_gsm8k_no_number_is_none():
    assert extract_answer("gsm8k", "I do not know.") is None
    assert extract_answer("gsm8k", "") is None
    assert extract_answer("gsm8k", "<answer>none</answer> 42") is None


def test_gsm8k_latex_votes_as_its_text():
    # math-verify grades LaTeX, so the last digit ("2") must not stand for \frac{7}{2}.
    a = extract_answer("gsm8k", "\\boxed{\\frac{7}{2}}")
    assert a == "\\frac{7}{2}"
    assert extract_answer("gsm8k", "the answer is \\frac{7}{ 2}") == "\\frac{7}{ 2}"
    assert a != extract_answer("gsm8k", "2")


def test_gsm8k_answer_agrees_with_the_reward():
    # Two completions with one answer string score the same under the gsm8k reward.
    row = {"target": "1000"}
    for completion in ["$1,000", "#### 1000.0", "1000", "<answer>1000</answer>"]:
        assert extract_answer("gsm8k", completion) == "1000"
        assert gsm8k("", completion, row) == 1.0
    assert gsm8k("", "999", row) == 0.0


@pytest.mark.parametrize(("completion", "expected"), [
    ("4321.", "4321"),
    ("4321", "4321"),
    ("43", "43"),
    ("4321..", "4321."),  # only the one stop is removed, as the reward reads it
    (".", None),
    ("", None),
])
def test_reverse_digits(completion, expected):
    assert extract_answer("reverse_digits", completion) == expected


def test_tasks_with_answers():
    assert {"gsm8k", "reverse_digits"} == HAS_ANSWERS
    with pytest.raises(KeyError, match="task='synthetic'.*gsm8k, reverse_digits"):
        extract_answer("synthetic", "1")
