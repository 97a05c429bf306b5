"""Built-in rewards on real GSM8K rows, the format and length rewards, and the code sandbox."""

import json
import os
import time

import pytest

from controller.datasets import gsm8k_path
from rewards.builtin import (
    answers_match,
    code_reward,
    extract_final_answer,
    format_reward,
    gsm8k,
    length_penalty,
    parse_number,
)
from rewards.sandbox import run_python


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


# ---------------------------------------------------------------------------------------------
# The sandbox


def test_sandbox_runs_code_in_its_own_directory():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\n"
                   "print(open('out.txt').read(), os.getcwd().split('/')[-1])")
    assert r.ok and r.stdout.split() == ["hi", "work"], r
    assert {"session", "rlimits", "audit"} <= set(r.isolation)


def test_sandbox_kills_an_infinite_loop_at_its_timeout():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and not r.ok and r.returncode is None
    assert 1.0 <= r.elapsed_s < 10 and time.monotonic() - t0 < 15


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])\n",
    "import os\nos.system(':(){ :|:& };:')\n",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n",
])
def test_sandbox_stops_fork_bombs(bomb):
    t0 = time.monotonic()
    r = run_python(bomb, timeout_s=5.0)
    assert not r.ok and not r.timed_out, r  # refused at once, not left to run
    assert "PermissionError: sandbox" in r.stderr
    assert time.monotonic() - t0 < 10


def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w')",
        f"import shutil\nshutil.copy('main.py', {str(target)!r})",
        "open('../escaped.txt', 'w').write('x')",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})",
    ]
    (tmp_path / "keep.txt").write_text("keep")
    for code in attempts:
        r = run_python(code, timeout_s=5.0)
        assert not r.ok and "PermissionError: sandbox" in r.stderr, (code, r)
    assert not target.exists()
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_sandbox_has_no_network_and_limited_memory():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert not r.ok and "socket" in r.stderr
    r = run_python("x = bytearray(1 << 30)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="RLIMIT_NPROC does not bind for root")
def test_sandbox_nproc_limit_binds_for_non_root():
    r = run_python("print('ok')")
    assert r.ok and "nproc" in r.isolation
