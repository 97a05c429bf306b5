"""Dataset rows -> prompt batches, with a resumable position.

The built-in `reverse_digits` task: the prompt is a digit string and "=", the answer is the
digits reversed, then "." (the stop token). Rows are a pure function of (seed, index), so a
run is reproducible and its data position is a single integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.config import DataConfig, JobConfig
from controller.hf_tokenizer import HFTokenizer
from controller.synthetic import SyntheticTokenizer, synthetic_row
from controller.tokenizer import CharTokenizer

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


@dataclass
class PromptBatch:
    rows: list[dict[str, Any]]
    tokens_PxL: np.ndarray  # left-padded prompt ids
    mask_PxL: np.ndarray  # True at real tokens


class TaskDataset:
    """Deterministic rows from a seed; `position` is how many rows were handed out."""

    def __init__(self, cfg: DataConfig, tokenizer: CharTokenizer, position: int = 0):
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


def build_tokenizer(cfg: JobConfig) -> CharTokenizer | SyntheticTokenizer:
    """The tokenizer the job's model and task use: model.path's own, else the task's."""
    if cfg.model.path:
        from controller.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(cfg.model.path)  # same interface as CharTokenizer
    if cfg.data.task == "synthetic":
        return SyntheticTokenizer(cfg.model.vocab_size or SYNTHETIC_VOCAB)
    if cfg.data.task != "reverse_digits":  # text tasks: any UTF-8 text on the built-in model
        from controller.tokenizer import ByteTokenizer

        return ByteTokenizer()  # type: ignore[return-value]  # same interface
    return digits_tokenizer()


def build_dataset(cfg: JobConfig, tokenizer: CharTokenizer, position: int = 0) -> TaskDataset:
    """The prompt source named by `data.task`, starting at `position` rows."""
    if cfg.data.task in ("gsm8k", "jsonl", "parquet"):
        from controller.datasets import TextDataset

        return TextDataset(cfg.data, tokenizer, position)  # type: ignore[return-value]
    return TaskDataset(cfg.data, tokenizer, position)


def encode_prompt(row: dict[str, Any], tokenizer: CharTokenizer) -> list[int]:
    """A row's prompt ids: chat-format rows ("messages": [{"role", "content"}, ...]) through the
    tokenizer's chat template with the generation prompt, plain rows ("prompt") as text."""
    if row.get("messages") is not None:
        if not isinstance(tokenizer, HFTokenizer):
            raise ValueError(
                f"row {row.get('index')} is chat-format (has 'messages') but the tokenizer "
                f"{type(tokenizer).__name__} has no chat template (fix: set model.path to a "
                f"model directory with one)")
        return tokenizer.encode_chat(row["messages"])
    return tokenizer.encode(row["prompt"])


def encode_prompts(rows: list[dict[str, Any]], tokenizer: CharTokenizer) -> PromptBatch:
    ids = [encode_prompt(r, tokenizer) for r in rows]
    width = max(len(x) for x in ids)
    tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, width - len(x):] = x
        mask[i, width - len(x):] = True
    return PromptBatch(rows, tokens, mask)
