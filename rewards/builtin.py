"""Built-in rewards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.registry import register_reward
from rewards.synthetic import synthetic_even


@register_reward("reverse_digits")
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


# The `synthetic` benchmark task's reward (a function of the completion's token ids).
register_reward("synthetic_even")(synthetic_even)
