"""What every part of `rewards` shares: errors, one call and its outcome, a configured reward.

This module imports nothing from the rest of the package, so the lookup, the backends and the
reward set can all build on it. Its types cross process boundaries (a `Call` is pickled to a
worker, an `Outcome` back), so they are plain frozen dataclasses.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

RewardFn = Callable[..., Any]

FAILURE_KINDS = ("error", "nonfinite", "timeout", "crash")


class RewardError(ValueError):
    """A reward that cannot be found or loaded, or a misconfigured reward set."""


class RewardFailureError(RuntimeError):
    """Too many reward calls failed in one step; the message shows an example traceback."""


@dataclass(frozen=True)
class RewardSpec:
    """A reward as configured: spec string, metrics label, kwargs and weight w_k."""

    spec: str
    label: str
    kwargs: Mapping[str, Any]
    weight: float


@dataclass(frozen=True)
class Call:
    """One reward function on one completion: the unit a backend runs and times out."""

    fn_index: int
    prompt: str
    completion: str
    completion_ids: list[int] | None
    row: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """How one call ended. `value` is a float or a dict of float components when kind="ok"
    (a tool call's value is its answer as text: `rewards.tools.ToolCall`)."""

    kind: str  # "ok" or one of FAILURE_KINDS
    value: float | dict[str, float] | str | None = None
    detail: str = ""  # the traceback or reason of a failure
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class BoundReward:
    """A resolved function with its call options; `call` never raises for user errors.

    `rewards.lookup.bind_reward` builds one from a spec string.
    """

    fn: RewardFn
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pass_ids: bool = False  # whether `fn` takes `completion_ids=`

    def call(self, c: Call) -> Outcome:
        t0 = time.perf_counter()
        try:
            extra = dict(self.kwargs)
            if self.pass_ids:
                extra["completion_ids"] = c.completion_ids
            raw = self.fn(c.prompt, c.completion, c.row, **extra)
        except Exception:
            return Outcome("error", None, traceback.format_exc(), time.perf_counter() - t0)
        return check_value(raw, time.perf_counter() - t0)


def _as_float(v: Any) -> float | None:
    if isinstance(v, (str, bytes)) or v is None:
        return None
    try:
        return float(v)  # int, float, bool, numpy scalars, 0-d arrays
    except (TypeError, ValueError):
        return None


def check_value(raw: Any, elapsed_s: float = 0.0) -> Outcome:
    """A reward's return value -> Outcome: finite floats (or a dict of them) are "ok"."""
    if isinstance(raw, Mapping):
        out: dict[str, float] = {}
        for k, v in raw.items():
            f = _as_float(v)
            if f is None:
                return Outcome("error", None, f"component {k!r} is {v!r}, not a number",
                               elapsed_s)
            if not math.isfinite(f):
                return Outcome("nonfinite", None, f"component {k!r} is {f}", elapsed_s)
            out[str(k)] = f
        if not out:
            return Outcome("error", None, "returned an empty dict", elapsed_s)
        return Outcome("ok", out, "", elapsed_s)
    f = _as_float(raw)
    if f is None:
        return Outcome("error", None,
                       f"returned {raw!r} ({type(raw).__name__}); a reward must return a float "
                       f"or a dict of floats", elapsed_s)
    if not math.isfinite(f):
        return Outcome("nonfinite", None, f"returned {f}", elapsed_s)
    return Outcome("ok", f, "", elapsed_s)


class Backend(Protocol):
    """Runs calls; returns one Outcome per call, in order, within the per-call timeout."""

    def run(self, calls: Sequence[Call]) -> list[Outcome]: ...

    def close(self) -> None: ...
