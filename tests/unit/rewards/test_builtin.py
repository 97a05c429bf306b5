"""Built-in rewards: reverse_digits, GSM8K on real rows, format, length and code."""

import json

import pytest

from controller.config import DataConfig
from controller.data.datasets import gsm8k_path
from controller.data.tasks import TaskDataset, digits_tokenizer, reverse_digits_row
from rewards.builtin import (
    answers_match,
    code_reward,
    extract_final_answer,
    format_reward,
    gsm8k,
    length_penalty,
    parse_number,
    reverse_digits,
)


def test_reverse_digits_partial_credit():
    row = {"target": "321"}
    assert reverse_digits("123=", "321.", row) == 1.0
    assert reverse_digits("123=", "321", row) == pytest.approx(0.9)  # right digits, no stop
    assert reverse_digits("123=", "391.", row) == pytest.approx(2 / 3)
    assert reverse_digits("123=", "3214.", row) == pytest.approx(3 / 4)  # extra digit costs
    assert reverse_digits("123=", ".", row) == 0.0


def test_task_rows_are_deterministic_and_resumable():
    a = [reverse_digits_row(0, i, 2, 4) for i in range(5)]
    assert a == [reverse_digits_row(0, i, 2, 4) for i in range(5)]
    assert all(row["target"] == row["prompt"][:-1][::-1] for row in a)
    ds = TaskDataset(DataConfig(prompts_per_step=3), digits_tokenizer())
    first = ds.next_batch()
    resumed = TaskDataset(DataConfig(prompts_per_step=3), digits_tokenizer(), position=3)
    assert resumed.next_batch().rows == ds.next_batch().rows
    assert first.mask_PxL[:, -1].all()  # left-padded: the last column is always real


@pytest.fixture(scope="module")
def gsm8k_test_rows():
    with open(gsm8k_path("test")) as f:
        return [json.loads(line) for line in f]


def test_gsm8k_reference_answers_score_one_on_every_test_row(gsm8k_test_rows):
    rows = gsm8k_test_rows
    assert len(rows) == 1319
    # The reference solution itself (reasoning, then "#### N") is a correct completion.
    scores = [gsm8k(r["question"], r["answer"], r) for r in rows]
    assert scores == [1.0] * len(rows)


def test_gsm8k_wrong_numbers_score_zero_on_every_test_row(gsm8k_test_rows):
    for r in gsm8k_test_rows:
        ref = parse_number(r["answer"].rsplit("####", 1)[1])
        wrong = ref + 1
        wrong_text = str(wrong.numerator) if wrong.denominator == 1 else str(float(wrong))
        assert gsm8k(r["question"], f"<answer>{wrong_text}</answer>", r) == 0.0, r["answer"]


def test_gsm8k_formatting_variants(gsm8k_test_rows):
    # Real rows whose references are written with thousands commas ("2,125", "1,450,000").
    comma_rows = [r for r in gsm8k_test_rows if "," in r["answer"].rsplit("####", 1)[1]]
    assert len(comma_rows) >= 10
    for r in comma_rows:
        plain = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k("", f"So the total is {plain}.", r) == 1.0
        assert gsm8k("", f"<answer>${plain}.00</answer>", r) == 1.0
    row = {"answer": "... #### 1000"}
    for completion in ("<answer>1,000</answer>", "The answer is $1,000.", "#### 1000.0",
                       "so \\boxed{1000}", "<think>9*100+100</think><answer> 1000 </answer>"):
        assert gsm8k("", completion, row) == 1.0, completion
    five = {"target": "5"}
    for completion in ("$5.00", "5.0", "answer: 5", "<answer>5</answer>"):
        assert gsm8k("", completion, five) == 1.0, completion
    for completion in ("$5.01", "50", "<answer>4</answer> 5", "no number here", ""):
        assert gsm8k("", completion, five) == 0.0, completion
    # The last explicit answer wins over numbers in the reasoning.
    assert gsm8k("", "3 + 2 = 5, minus 1 ... #### 4", five) == 0.0
    # LaTeX goes to math-verify: 7/2 = 3.5.
    assert answers_match("\\frac{7}{2}", "3.5")
    assert not answers_match("\\frac{7}{3}", "3.5")
    assert extract_final_answer("x <answer>1</answer> y <answer>2</answer>") == "2"


def test_gsm8k_row_without_reference_is_an_error_not_zero():
    with pytest.raises(KeyError, match="neither 'target' nor 'answer'"):
        gsm8k("", "5", {"question": "?"})


def test_format_reward():
    assert format_reward("", "<think>2+2</think> <answer>4</answer>", {}) == 1.0
    assert format_reward("", "<reasoning>r</reasoning>\n<answer>4</answer>\n", {}) == 1.0
    assert format_reward("", "<answer>4</answer>", {}) == 0.5  # answer tags, no reasoning
    assert format_reward("", "<think></think><answer>4</answer>", {}) == 0.5  # empty reasoning
    assert format_reward("", "<think>x</think><answer>4</answer> trailing", {}) == 0.5
    assert format_reward("", "4", {}) == 0.0


def test_length_penalty_is_dapos_soft_overlong_punishment():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then linear down to -1 at 10, -1 beyond.
    kw = {"max_len": 10, "buffer": 4}
    ids = lambda n: list(range(n))  # noqa: E731
    assert length_penalty("", "", {}, ids(6), **kw) == 0.0
    assert length_penalty("", "", {}, ids(8), **kw) == pytest.approx((6 - 8) / 4)  # -0.5
    assert length_penalty("", "", {}, ids(10), **kw) == pytest.approx(-1.0)
    assert length_penalty("", "", {}, ids(11), **kw) == -1.0
    # Without token ids the length is counted in characters.
    assert length_penalty("", "x" * 9, {}, None, **kw) == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="buffer"):
        length_penalty("", "", {}, None, max_len=4, buffer=5)


def test_code_reward_counts_passing_tests():
    completion = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    row = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]}
    assert code_reward("", completion, row, timeout_s=5) == pytest.approx(2 / 3)
    io_row = {"test_cases": [{"input": "3\n", "output": "6"}, {"input": "5\n", "output": "11"}]}
    assert code_reward("", "print(int(input()) * 2)", io_row, timeout_s=5) == 0.5
    with pytest.raises(KeyError, match="no 'tests'"):
        code_reward("", "print(1)", {})
