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
    truncated: int = 0  # prompts cut to the budget (data.truncate_prompts)


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


def truncate_left(ids: list[int], max_tokens: int, bos_id: int | None) -> list[int]:
    """The last `max_tokens` ids of a prompt: its end holds the question and any generation
    prompt. A leading BOS stays first (models such as Gemma expect it)."""
    if len(ids) <= max_tokens:
        return ids
    if bos_id is not None and max_tokens > 1 and ids[0] == bos_id:
        return [bos_id, *ids[len(ids) - max_tokens + 1:]]
    return ids[len(ids) - max_tokens:]


def batch_from_ids(rows: list[dict[str, Any]], ids: list[list[int]], tokenizer: Tokenizer, *,
                   max_tokens: int | None = None, min_width: int | None = None) -> PromptBatch:
    """Prompt ids -> the left-padded batch.

    Args:
      max_tokens: prompts longer than this are left-truncated to it (`truncate_left`) and
        counted in `PromptBatch.truncated`; None: kept whole.
      min_width: pad to the longest prompt rounded up to a power of two, at least min_width, so
        the sampler and trainer compile for a few widths, not one per batch (a compile-cost
        trade-off); None: pad to the longest prompt.
    """
    truncated = 0
    if max_tokens is not None:
        cut = [truncate_left(x, max_tokens, tokenizer.bos_id) for x in ids]
        truncated = sum(len(a) != len(b) for a, b in zip(ids, cut, strict=True))
        ids = cut
    width = None
    if min_width is not None:
        longest = max(len(x) for x in ids)
        width = max(min_width, 1 << (longest - 1).bit_length())
    return PromptBatch(rows, *pad_prompts(ids, tokenizer.pad_id, width), truncated=truncated)


def encode_prompts(rows: list[dict[str, Any]], tokenizer: Tokenizer, *,
                   max_tokens: int | None = None) -> PromptBatch:
    """Rows -> their prompts' ids (`encode_prompt`) -> the left-padded batch; see
    `batch_from_ids` for `max_tokens`."""
    ids = [encode_prompt(r, tokenizer) for r in rows]
    return batch_from_ids(rows, ids, tokenizer, max_tokens=max_tokens)
