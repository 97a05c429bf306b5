"""The sampler interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Completions:
    """Generated tokens for B rows, right-padded to T = max_new_tokens.

    mask_BxT marks real completion tokens (the stop token included, padding after it not);
    logps_BxT is the log-probability the sampler drew each token with (0 where masked).
    """

    tokens_BxT: Any
    logps_BxT: Any
    mask_BxT: Any


class WeightMismatchError(ValueError):
    """load_weights got a tree whose structure, shapes, dtypes or shardings do not fit."""


class Sampler(Protocol):
    def generate(self, prompt_tokens_BxP: Any, prompt_mask_BxP: Any, rng: Any) -> Completions:
        """Completions for left-padded prompts (one row per completion wanted)."""
        ...

    def load_weights(self, params: Any) -> None:
        """Replaces the sampler's weights; the only way they change."""
        ...
