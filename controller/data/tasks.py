"""The built-in tasks, whose rows are generated rather than read from a file.

`reverse_digits`: the prompt is a digit string and "=", the answer is the digits reversed, then
"." (the stop token). `synthetic`: random prompt ids of a fixed length (benchmarks). Rows are a
pure function of (seed, index), so a run is reproducible and its data position is one integer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from controller.config import DataConfig
from controller.data.batch import PromptBatch, encode_prompts
from controller.data.synthetic import synthetic_row
from controller.data.tokenizer import CharTokenizer, Tokenizer

DIGITS_ALPHABET = "0123456789=."
SYNTHETIC_VOCAB = 1024  # the synthetic task's vocabulary when model.vocab_size is unset


def digits_tokenizer() -> CharTokenizer:
    return CharTokenizer(DIGITS_ALPHABET, stop=".")


def reverse_digits_row(seed: int, index: int, min_digits: int, max_digits: int
                       ) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(min_digits, max_digits + 1))
    digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
    return {"index": index, "prompt": f"{digits}=", "target": digits[::-1]}


class TaskDataset:
    """Deterministic rows from a seed; `position` is how many rows were handed out."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, position: int = 0):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.position = position

    def row(self, index: int) -> dict[str, Any]:
        c = self.cfg
        if c.task == "synthetic":
            return synthetic_row(c.seed, index, c.prompt_tokens, self.tokenizer.vocab_size)
        return reverse_digits_row(c.seed, index, c.min_digits, c.max_digits)

    def next_batch(self, n: int | None = None) -> PromptBatch:
        n = n or self.cfg.prompts_per_step
        rows = [self.row(self.position + i) for i in range(n)]
        self.position += n
        return encode_prompts(rows, self.tokenizer)
