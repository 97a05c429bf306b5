"""The `synthetic` task: random token-id prompts, fixed-length completions, a cheap reward.

It exists for benchmarks (`bench/grpo_step.py`): the same job must run in Tandem, TRL and
Tunix, so it needs no tokenizer files, its prompts are a pure function of (seed, index), and
completions never stop early (the tokenizer has no stop token, so every row generates exactly
`sampling.max_new_tokens` tokens).

Token id i is written as the text `t<i>`; a prompt or completion is those words joined by
spaces. The reward (`rewards.synthetic`) parses the ids back from the text, so every framework
can score the same completion the same way from its decoded text.

This module must not import jax (the config is validated before JAX starts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_TOKEN = re.compile(r"t(\d+)")


class SyntheticTokenizer:
    """`vocab_size` ids, each rendered as the word `t<id>`; no BOS, no stop token.

    It has the CharTokenizer interface the loop uses (`encode`, `decode`, `vocab_size`,
    `pad_id`, `stop_ids`). `pad_id` is id 0, a real token: padding is only ever read through
    a mask, and synthetic prompts all have the same length, so nothing is padded.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"synthetic vocab_size={vocab_size}: must be >= 2")
        self._vocab_size = vocab_size
        self.pad_id = 0
        self.bos_id = None  # prompts are raw ids, as in the peer frameworks' runs
        self.stop_id = None
        self.stop_ids: tuple[int, ...] = ()  # empty: completions run to max_new_tokens

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """`"t5 t17"` -> `[5, 17]`. `bos` is accepted for interface parity; there is no BOS."""
        words = text.split()
        ids = []
        for w in words:
            m = _TOKEN.fullmatch(w)
            if m is None or int(m.group(1)) >= self._vocab_size:
                raise ValueError(
                    f"synthetic text {text[:60]!r}: word {w!r} is not a token t<id> with id < "
                    f"{self._vocab_size}"
                )
            ids.append(int(m.group(1)))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """`[5, 17]` -> `"t5 t17"`; every id is kept (there is no stop token)."""
        return " ".join(f"t{int(i)}" for i in ids)


def synthetic_prompt_ids(seed: int, index: int, length: int, vocab_size: int) -> list[int]:
    """Row `index`'s prompt: `length` ids drawn uniformly from [0, vocab_size)."""
    rng = np.random.default_rng([seed, index])
    return [int(x) for x in rng.integers(0, vocab_size, size=length)]


def synthetic_row(seed: int, index: int, length: int, vocab_size: int) -> dict[str, Any]:
    ids = synthetic_prompt_ids(seed, index, length, vocab_size)
    return {"index": index, "prompt": " ".join(f"t{i}" for i in ids), "prompt_ids": ids}
