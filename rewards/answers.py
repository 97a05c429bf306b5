"""Final answers extracted from completions, for majority voting (maj@k) in evaluation.

`extract_answer(task, completion)` returns a canonical string: two completions give the same
string exactly when they state the same answer, and None when they state none. The tasks with
an extractor are `HAS_ANSWERS`; for the others maj@k does not apply.

- gsm8k: the number the `gsm8k` reward compares (the last number of the final-answer segment
  `extract_final_answer` finds), as its exact value: "1,000", "1000.0" and "$1000" all give
  "1000", "0.5" and "1/2" give "1/2". A segment with LaTeX math (`\\frac{7}{2}`) is graded by
  math-verify rather than by its last number, so it votes as its own text, whitespace collapsed.
- reverse_digits: the completion up to its stop "." as the `reverse_digits` reward reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rewards.builtin import LATEX_MATH, extract_final_answer, last_number, parse_number


def gsm8k_answer(completion: str) -> str | None:
    """The exact value of the completion's final number: `str(Fraction)`, e.g. "1000", "-3/4"."""
    segment = extract_final_answer(completion)
    if LATEX_MATH.search(segment):
        return " ".join(segment.split())
    text = last_number(segment)
    value = parse_number(text) if text else None
    return None if value is None else str(value)


def reverse_digits_answer(completion: str) -> str | None:
    """The completion without its stop "."; None when nothing is left."""
    answer = completion[:-1] if completion.endswith(".") else completion
    return answer or None


# Keyed by task name (`data.task`, and the name of the task's reward).
EXTRACTORS: Mapping[str, Callable[[str], str | None]] = {
    "gsm8k": gsm8k_answer,
    "reverse_digits": reverse_digits_answer,
}
HAS_ANSWERS: frozenset[str] = frozenset(EXTRACTORS)


def extract_answer(task: str, completion: str) -> str | None:
    """The canonical answer `completion` states for `task`, or None when it states none.

    Raises:
        KeyError: `task` has no extractor (see `HAS_ANSWERS`).
    """
    if task not in EXTRACTORS:
        raise KeyError(f"task={task!r} has no answer extractor, so maj@k does not apply "
                       f"(tasks with one: {', '.join(sorted(HAS_ANSWERS))})")
    return EXTRACTORS[task](completion)
