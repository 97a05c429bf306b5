"""Built-in rewards: reverse_digits, gsm8k, format, length_penalty, code.

Each is a plain function `(prompt, completion, row, **kwargs) -> float`. The names a config uses
for them are the table `rewards.lookup.BUILTINS`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from rewards.sandbox import STRICT_FIX, SandboxUnavailableError, run_python


def reverse_digits(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """Partial credit for reversing the prompt's digits.

    answer = completion up to the stop "."; score = (# positions where answer matches target)
    / max(len(target), len(answer)), so extra or missing characters cost credit. A perfect
    answer that also ends with "." gets 1.0; a perfect answer without the stop gets 0.9×.
    """
    target = str(row["target"])
    stopped = completion.endswith(".")
    answer = completion[:-1] if stopped else completion
    hits = sum(a == t for a, t in zip(answer, target, strict=False))
    score = hits / max(len(target), len(answer), 1)
    return score if stopped else 0.9 * score


# ---------------------------------------------------------------------------------------------
# GSM8K

# A number as people write it: -1,234.5  $5.00  .5  3/4  12%  (thousands commas only in
# groups of three, so "1,2,3" is three numbers).
_NUMBER = re.compile(
    r"(?<![\w.])-?\$?\s?(?:\d+\s?/\s?\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)%?"
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
# LaTeX math in an answer segment: the gsm8k reward hands such a segment to math-verify.
LATEX_MATH = re.compile(r"\\(?:d|t)?frac|\\sqrt|\\pi|\\cdot|\^")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(.*)", re.I | re.S)


def parse_number(text: str) -> Fraction | None:
    """`"$1,000.50"` -> 1000.5 (exact), `"3/4"` -> 3/4, `"12%"` -> 12; None if no number."""
    t = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    t = t.rstrip(".")
    if not t:
        return None
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den)) if Decimal(den) else None
        return Fraction(Decimal(t))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_reference(answer: str) -> str:
    """GSM8K's reference answer: the text after the last `####`."""
    return answer.rsplit("####", 1)[-1].strip()


def extract_final_answer(completion: str) -> str:
    """The segment of a completion that holds its final answer, most explicit form first:
    the last `<answer>…</answer>`, then text after `####`, then `\\boxed{…}`, then text after
    "answer is"/"answer:", else the whole completion."""
    if m := _ANSWER_TAG.findall(completion):
        return m[-1]
    if "####" in completion:
        return completion.rsplit("####", 1)[-1]
    if m := _BOXED.findall(completion):
        return m[-1]
    if m := _ANSWER_IS.findall(completion):
        return m[-1]
    return completion


def answers_match(predicted: str, reference: str, abs_tol: float = 1e-6,
                  rel_tol: float = 1e-9) -> bool:
    """Tolerant comparison of a final-answer segment against a reference answer.

    Numbers are parsed exactly (as fractions) and compare by value:
    |p − r| ≤ max(abs_tol, rel_tol · |r|), so `1,000` = `1000`, `$5.00` = `5`, `5.0` = `5`,
    `0.5` = `1/2`, but 1,450,001 ≠ 1,450,000. When the segment holds no plain number (LaTeX
    such as `\\frac{7}{2}`), `math-verify` decides, if it is installed.
    """
    ref = parse_number(reference) if reference else None
    if ref is None:
        ref_text = last_number(reference)
        ref = parse_number(ref_text) if ref_text else None
    pred_text = last_number(predicted)
    pred = parse_number(pred_text) if pred_text else None
    latex = bool(LATEX_MATH.search(predicted))
    if ref is not None and pred is not None and not latex:
        return abs(pred - ref) <= max(abs_tol, rel_tol * abs(ref))
    if not latex and pred is None:
        return False  # no number and no math: nothing for math-verify to find (and it is slow)
    return _math_verify(predicted, reference)


class _NoTimeoutNotice(logging.Filter):
    """Drops math-verify's "Timeout is disabled" notice: our backends enforce the timeout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _math_verify(predicted: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return False
    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTimeoutNotice) for f in log.filters):
            log.addFilter(_NoTimeoutNotice())
    # No signal-based timeouts inside math-verify: the reward backend enforces rewards.timeout_s
    # (and SIGALRM is unavailable off the main thread).
    gold = parse(reference, parsing_timeout=None)
    pred = parse(predicted, parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def gsm8k(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """1.0 if the completion's final answer equals the GSM8K reference, else 0.0.

    The reference is `row["target"]` (the GSM8K loader puts the number after `####` there) or,
    failing that, the text after `####` in `row["answer"]`. The final answer is found by
    `extract_final_answer` and compared by `answers_match`.
    """
    if row.get("target") not in (None, ""):
        reference = str(row["target"])
    elif "answer" in row:
        reference = extract_reference(str(row["answer"]))
    else:
        raise KeyError("gsm8k reward: the row has neither 'target' nor 'answer' "
                       "(fix: data.columns={target: <your answer column>})")
    return 1.0 if answers_match(extract_final_answer(completion), reference) else 0.0


def _warm_gsm8k() -> None:
    """Imports math-verify (and sympy, about 2 s) before the first timed call."""
    import math_verify  # noqa: F401


gsm8k.warmup = _warm_gsm8k  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Format and length

_FORMAT = re.compile(
    r"^\s*<(think|reasoning)>.*?\S.*?</\1>\s*<answer>.*?\S.*?</answer>\s*$", re.S)


def format_reward(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """1.0 if the completion is `<think>…</think>` (or `<reasoning>…</reasoning>`) followed by
    `<answer>…</answer>` and nothing else (whitespace aside), both non-empty; 0.5 if it has a
    non-empty `<answer>…</answer>` but not the full form; else 0.0."""
    if _FORMAT.match(completion):
        return 1.0
    return 0.5 if any(a.strip() for a in _ANSWER_TAG.findall(completion)) else 0.0


def length_penalty(prompt: str, completion: str, row: Mapping[str, Any],
                   completion_ids: Sequence[int] | None = None, *, max_len: int = 512,
                   buffer: int = 128) -> float:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), in (−1, 0]:

        R(y) = 0                              if |y| ≤ L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
             = −1                             if |y| > L_max

    with L_max = `max_len`, L_cache = `buffer`, |y| the completion's token count (its
    character count when token ids are not given). Set them with
    `rewards.kwargs={length_penalty: {max_len: 256, buffer: 64}}`.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"length_penalty: need 0 < buffer <= max_len, got buffer={buffer}, "
                         f"max_len={max_len}")
    n = len(completion_ids) if completion_ids is not None else len(completion)
    free = max_len - buffer
    if n <= free:
        return 0.0
    if n <= max_len:
        return (free - n) / buffer
    return -1.0


# ---------------------------------------------------------------------------------------------
# Code execution

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python … ```), or the whole completion if none."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def code_reward(prompt: str, completion: str, row: Mapping[str, Any], *,
                timeout_s: float = 5.0, memory_mb: int = 512, strict: bool = False) -> float:
    """The fraction of the row's tests the completion's code passes, each run in the sandbox.

    Tests come from `row["tests"]`, a list of Python statements (usually asserts) run after the
    code, each in its own sandboxed process (pass = exit code 0), or `row["test_cases"]`, a list
    of `{"input": stdin, "output": expected stdout}` (pass = stripped stdout matches). Code that
    loops forever, forks, opens sockets or writes outside its directory fails that test; see
    `rewards.sandbox`. A row with no tests is an error (reported, never a silent 0).

    Options come from `rewards.kwargs.code`: `timeout_s` and `memory_mb` per test, and `strict`:
    true refuses to run any code (every call fails with `SandboxUnavailableError`) where the OS
    does not enforce the sandbox's filesystem rules (Landlock or a mount namespace) and process
    rules (seccomp, or RLIMIT_NPROC for non-root), instead of leaving them to the audit hook.
    """
    code = extract_code(completion)
    tests = row.get("tests")
    cases = row.get("test_cases")
    run = functools.partial(run_python, timeout_s=timeout_s, memory_mb=memory_mb, strict=strict)
    try:
        if tests:
            return sum(run(f"{code}\n\n{t}\n").ok for t in tests) / len(tests)
        if cases:
            passed = 0
            for case in cases:
                res = run(code, stdin=str(case["input"]))
                passed += res.ok and res.stdout.strip() == str(case["output"]).strip()
            return passed / len(cases)
    except SandboxUnavailableError as e:
        raise SandboxUnavailableError(
            f"rewards.kwargs.code.strict=true: {e.reason} (fix: {STRICT_FIX}; or set "
            f"rewards.kwargs.code.strict=false to run with the layers there are)",
            e.reason) from None
    raise KeyError("code reward: the row has no 'tests' (list of asserts) or 'test_cases' "
                   "(list of {input, output})")
