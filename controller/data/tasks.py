"""The built-in tasks, whose rows are generated rather than read from a file.

`reverse_digits`: the prompt is a digit string and "=", the answer is the digits reversed, then
"." (the stop token); a fixed tenth of the numbers is the held-out test split, which the train
split never draws. `synthetic`: random prompt ids of a fixed length (benchmarks). Rows are a
pure function of (seed, index), so a run is reproducible and its data position is one integer.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from controller.config import ConfigError, DataConfig
from controller.data.batch import PromptBatch, encode_prompt, encode_prompts
from controller.data.budget import PromptBudget
from controller.data.synthetic import synthetic_row
from controller.data.tokenizer import CharTokenizer, Tokenizer

DIGITS_ALPHABET = "0123456789=."
SYNTHETIC_VOCAB = 1024  # the synthetic task's vocabulary when model.vocab_size is unset
SYNTHETIC_TEST_SEED = 1_000_003  # added to data.seed for the synthetic task's test split


def digits_tokenizer(extra: str = "") -> CharTokenizer:
    """The task's characters, and after them `extra` ones a multi-turn environment writes
    (`Environment.alphabet`): the task's ids stay the same."""
    more = "".join(dict.fromkeys(c for c in extra if c not in DIGITS_ALPHABET))
    return CharTokenizer(DIGITS_ALPHABET + more, stop=".")


def held_out(digits: str) -> bool:
    """Whether a digit string belongs to reverse_digits' held-out split (about 1 in 10, fixed
    by a hash of the string, so the two splits never share a prompt)."""
    return zlib.crc32(digits.encode()) % 10 == 0


def reverse_digits_row(seed: int, index: int, min_digits: int, max_digits: int,
                       split: str = "train") -> dict[str, Any]:
    """Row `index` of a split: draws from (seed, index) until the number is in the split."""
    rng = np.random.default_rng([seed, index])
    while True:
        n = int(rng.integers(min_digits, max_digits + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
        if held_out(digits) == (split == "test"):
            return {"index": index, "prompt": f"{digits}=", "target": digits[::-1]}


class TaskDataset:
    """Deterministic rows from a seed; `position` is how many rows were handed out."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, position: int = 0, *,
                 budget: PromptBudget | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.position = position
        self.budget = budget or PromptBudget.from_data(cfg)
        # Generated rows cannot be skipped (the data position is a row count), so a task whose
        # longest prompt is over the budget is an error now, not a bad row later.
        longest = len(encode_prompt(self._longest_row(), tokenizer))
        if longest > self.budget.tokens and not self.budget.truncate:
            fix = ("data.prompt_tokens" if cfg.task == "synthetic" else "data.max_digits")
            raise ConfigError(
                f"data.task={cfg.task}: its longest prompt is {longest} tokens, more than "
                f"{self.budget.source} (fix: a smaller {fix}, or data.truncate_prompts=true)")

    def _longest_row(self) -> dict[str, Any]:
        """A row whose prompt is as long as this task's prompts get."""
        if self.cfg.task == "synthetic":
            return self.row(0)  # every synthetic prompt has prompt_tokens ids
        return {"prompt": "9" * self.cfg.max_digits + "="}

    def row(self, index: int) -> dict[str, Any]:
        c = self.cfg
        if c.task == "synthetic":  # random ids: the test split is another seed's rows
            seed = c.seed if c.split == "train" else c.seed + SYNTHETIC_TEST_SEED
            return synthetic_row(seed, index, c.prompt_tokens, self.tokenizer.vocab_size)
        return reverse_digits_row(c.seed, index, c.min_digits, c.max_digits, c.split)

    def next_batch(self, n: int | None = None) -> PromptBatch:
        n = n or self.cfg.prompts_per_step
        rows = [self.row(self.position + i) for i in range(n)]
        self.position += n
        return encode_prompts(
            rows, self.tokenizer, max_tokens=self.budget.tokens if self.budget.truncate else None)
