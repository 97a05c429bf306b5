"""The synthetic task's reward: a cheap deterministic function of the completion's token ids.

Standard library only, so the benchmark's peer runners (TRL, Tunix, each in its own virtual
environment) import this same file and score completions exactly as Tandem does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_TOKEN = re.compile(r"t(\d+)")


def completion_ids(text: str) -> list[int]:
    """The token ids of a synthetic completion's text (`"t5 t17"` -> `[5, 17]`)."""
    return [int(m) for m in _TOKEN.findall(text)]


def even_fraction(ids: Sequence[int]) -> float:
    """r = #{i : id_i even} / max(n, 1): in [0, 1], 0.5 in expectation for uniform ids."""
    return sum(1 for i in ids if int(i) % 2 == 0) / max(len(ids), 1)


def synthetic_even(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """The reward-function signature of `rewards.registry`: the even fraction of the text's ids."""
    return even_fraction(completion_ids(completion))
