"""Dataset rows -> the left-padded prompt batch the sampler and trainer take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.data.hf_tokenizer import HFTokenizer
from controller.data.tokenizer import Tokenizer
from sampler.base import left_pad


@dataclass
class PromptBatch:
    rows: list[dict[str, Any]]
    tokens_PxL: np.ndarray  # left-padded prompt ids: real tokens right-aligned
    mask_PxL: np.ndarray  # True at real tokens


def pad_prompts(ids: Sequence[Sequence[int]], pad_id: int, width: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Prompt id lists -> ([P, width] ids, mask), left-padded; width defaults to the longest."""
    width = width or max(len(x) for x in ids)
    rows = [left_pad(np.asarray([x], np.int32), np.ones((1, len(x)), bool), width, pad_id)
            for x in ids]
    return (np.concatenate([t for t, _ in rows]).astype(np.int32),
            np.concatenate([m for _, m in rows]))


def encode_prompt(row: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
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


def encode_prompts(rows: list[dict[str, Any]], tokenizer: Tokenizer) -> PromptBatch:
    ids = [encode_prompt(r, tokenizer) for r in rows]
    return PromptBatch(rows, *pad_prompts(ids, tokenizer.pad_id))
