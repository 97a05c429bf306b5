"""Reward functions by name or `module:function`.

A reward function takes (prompt, completion, row) — the prompt text, the completion text (up to
and including the stop token) and the dataset row's fields — and returns a float.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

_REGISTRY: dict[str, RewardFn] = {}


class RewardError(ValueError):
    """A reward that cannot be found, or that returned something that is not a finite float."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RewardError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def registered_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    importlib.import_module("rewards.builtin")


def get_reward(name: str) -> RewardFn:
    """A registered name, or `package.module:function`."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"rewards.functions: cannot import {module_name!r} ({e})") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"rewards.functions: {module_name!r} has no function {attr!r}")
        return fn
    raise RewardError(
        f"rewards.functions: unknown reward {name!r} (fix: one of {registered_rewards()} or "
        f"'module:function')"
    )


class RewardSet:
    """Several reward functions combined with weights: r = Σ_k w_k r_k."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None):
        self.names = list(names)
        self.fns = [get_reward(n) for n in self.names]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.fns)

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, float]]:
        """Returns (total per completion, mean of each component)."""
        totals = [0.0] * len(completions)
        components: dict[str, float] = {}
        for name, fn, w in zip(self.names, self.fns, self.weights, strict=True):
            values = []
            for prompt, completion, row in zip(prompts, completions, rows, strict=True):
                v = fn(prompt, completion, row)
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise RewardError(
                        f"reward {name!r} returned {v!r} for prompt {prompt!r} and completion "
                        f"{completion!r}; rewards must be finite floats"
                    )
                values.append(float(v))
            for i, v in enumerate(values):
                totals[i] += w * v
            components[name] = sum(values) / max(len(values), 1)
        return totals, components
