"""Reward functions by name, `module:function` or file path, combined with weights.

A reward function is called as

    fn(prompt, completion, row, [completion_ids=ids,] **kwargs) -> float | dict[str, float]

with the prompt text, the completion text (up to the stop token) and the dataset row's fields.
It gets `completion_ids` (the completion's token ids) only if its signature names that
parameter or takes `**kwargs`; `kwargs` come from `rewards.kwargs[<label>]`. A dict return is a
set of named components, combined as r_k = Σ_c w_{k,c} v_c (`rewards.component_weights`, keyed
"<label>/<component>", default 1.0). Several functions combine as r = Σ_k w_k r_k.

Rewards are user code and fail: they raise, hang, return NaN or kill their process. Every call
ends in one `Outcome`: "ok", or a failure of kind "error" (raised, or returned a non-number),
"nonfinite" (NaN/inf), "timeout" (cut at `rewards.timeout_s`) or "crash" (its worker died). A
failed call scores `rewards.fallback_score`, is counted in `rewards/failures_<kind>`, and if
more than `rewards.max_failure_fraction` of a step's calls fail the step stops with a
`RewardFailureError` showing one example traceback. Nothing is silently zero.

Where calls run is the backend's business (`rewards.pool`: in-process or a process pool;
`rewards.ray_backend`: Ray actors); this module holds what all of them share.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from controller.config import RewardsConfig

RewardFn = Callable[..., Any]

FAILURE_KINDS = ("error", "nonfinite", "timeout", "crash")

_REGISTRY: dict[str, RewardFn] = {}


class RewardError(ValueError):
    """A reward that cannot be found or loaded, or a misconfigured reward set."""


class RewardFailureError(RuntimeError):
    """Too many reward calls failed in one step; the message shows an example traceback."""


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


# ---------------------------------------------------------------------------------------------
# Resolving a spec to a function


def _split_file_spec(spec: str) -> tuple[str, str] | None:
    """`a/b.py` -> ("a/b.py", "reward"); `a/b.py:fn` -> ("a/b.py", "fn"); else None."""
    if spec.endswith(".py"):
        return spec, "reward"
    path, sep, attr = spec.rpartition(":")
    return (path, attr) if sep and path.endswith(".py") and attr else None


def normalize_spec(spec: str) -> str:
    """A spec that resolves the same in any process: file paths made absolute."""
    split = _split_file_spec(spec)
    if split is None:
        return spec
    return f"{Path(split[0]).expanduser().resolve()}:{split[1]}"


def _load_file(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RewardError(f"rewards.functions: file {path!r} does not exist (fix: check the path)")
    # One module per file path, reused: loading twice would re-run the file's top level.
    name = "tandem_reward_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        raise RewardError(
            f"rewards.functions: loading {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def get_reward(spec: str) -> RewardFn:
    """A registered name, `package.module:function`, or `path/to/file.py[:function]`."""
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    split = _split_file_spec(normalize_spec(spec))
    if split is not None:
        path, attr = split
        module = _load_file(path)
        where = path
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"rewards.functions: cannot import {module_name!r} ({e})") from e
        where = module_name
    else:
        raise RewardError(
            f"rewards.functions: unknown reward {spec!r} (fix: one of {registered_rewards()}, "
            f"'module:function' or 'path/to/file.py:function')"
        )
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"rewards.functions: {where!r} has no function {attr!r}")
    return fn


def reward_label(spec: str) -> str:
    """The short name a reward's metrics and kwargs go by: the registered or function name."""
    if spec in _REGISTRY:
        return spec
    split = _split_file_spec(spec)
    if split is not None:
        return split[1]
    return spec.rpartition(":")[2] if ":" in spec else spec


def accepts_ids(fn: RewardFn) -> bool:
    """Whether `fn` takes `completion_ids=` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completion_ids" or p.kind is p.VAR_KEYWORD for p in params)


# ---------------------------------------------------------------------------------------------
# One call and its outcome; shared by every backend (and run inside worker processes)


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
    """How one call ended. `value` is a float or a dict of float components when kind="ok"."""

    kind: str  # "ok" or one of FAILURE_KINDS
    value: float | dict[str, float] | None = None
    detail: str = ""  # the traceback or reason of a failure
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class BoundReward:
    """A resolved function with its call options; `call` never raises for user errors."""

    fn: RewardFn
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pass_ids: bool = False

    @classmethod
    def resolve(cls, spec: str, kwargs: Mapping[str, Any] | None = None, *,
                warmup: bool = False) -> BoundReward:
        """The function `spec` names; with `warmup`, also runs its `fn.warmup()` if it has one
        (slow one-time set-up, such as imports, that must not count against a call's
        timeout; backends call it once per worker)."""
        fn = get_reward(spec)
        if warmup and callable(getattr(fn, "warmup", None)):
            fn.warmup()
        return cls(fn, dict(kwargs or {}), accepts_ids(fn))

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


# ---------------------------------------------------------------------------------------------
# The set of rewards a job uses


@dataclass(frozen=True)
class RewardSpec:
    """A reward as configured: spec string, metrics label, kwargs and weight w_k."""

    spec: str
    label: str
    kwargs: Mapping[str, Any]
    weight: float


def build_specs(functions: Sequence[str], weights: Sequence[float] | None = None,
                kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> list[RewardSpec]:
    """Resolves labels (duplicates get "_2", "_3") and checks kwargs name a known label."""
    _load_builtins()
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise RewardError(
            f"rewards.weights has {len(weights)} entries for {len(functions)} functions "
            f"(fix: one weight per function)")
    kwargs = dict(kwargs or {})
    out: list[RewardSpec] = []
    seen: dict[str, int] = {}
    for spec, w in zip(functions, weights, strict=True):
        base = reward_label(spec)
        seen[base] = seen.get(base, 0) + 1
        label = base if seen[base] == 1 else f"{base}_{seen[base]}"
        out.append(RewardSpec(normalize_spec(spec), label,
                              dict(kwargs.get(label, kwargs.get(base, {}))), float(w)))
    unknown = set(kwargs) - {s.label for s in out} - {reward_label(f) for f in functions}
    if unknown:
        raise RewardError(
            f"rewards.kwargs names {sorted(unknown)}, which are not rewards of this job "
            f"(fix: use one of {[s.label for s in out]})")
    return out


class RewardSet:
    """Several rewards combined with weights, r = Σ_k w_k r_k, scored on a backend.

    Args:
      functions: specs (registered name, `module:function`, `file.py:function`).
      weights: w_k per function (default 1.0).
      kwargs: per-label keyword arguments for the functions.
      component_weights: w_{k,c} keyed "<label>/<component>" (default 1.0).
      backend: where calls run (default: in this process, `rewards.pool.LocalBackend`).
      fallback_score: the value a failed call contributes to r_k.
      max_failure_fraction: more failed calls than this fraction in one `score` raises.
    """

    def __init__(self, functions: Sequence[str], weights: Sequence[float] | None = None, *,
                 kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                 component_weights: Mapping[str, float] | None = None,
                 backend: Backend | None = None, fallback_score: float = 0.0,
                 max_failure_fraction: float = 0.1, timeout_s: float | None = None):
        self.specs = build_specs(functions, weights, kwargs)
        self.names = [s.label for s in self.specs]
        self.weights = [s.weight for s in self.specs]
        self.component_weights = dict(component_weights or {})
        bad = {k for k in self.component_weights if k.partition("/")[0] not in self.names
               or not k.partition("/")[2]}
        if bad:
            raise RewardError(
                f"rewards.component_weights keys {sorted(bad)} do not name "
                f"'<label>/<component>' of this job's rewards {self.names} "
                f"(fix: e.g. {self.names[0]}/correct)")
        self.fallback_score = float(fallback_score)
        self.max_failure_fraction = float(max_failure_fraction)
        if backend is None:
            from rewards.pool import LocalBackend

            backend = LocalBackend(self.specs, timeout_s=timeout_s)
        self.backend = backend

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> RewardSet:
        """The reward set and backend that `cfg` (a `RewardsConfig`) describes."""
        from rewards.pool import build_backend

        specs = build_specs(cfg.functions, cfg.weights, cfg.kwargs)
        return cls(cfg.functions, cfg.weights, kwargs=cfg.kwargs,
                   component_weights=cfg.component_weights, backend=build_backend(cfg, specs),
                   fallback_score=cfg.fallback_score,
                   max_failure_fraction=cfg.max_failure_fraction)

    def _combine(self, label: str, value: float | dict[str, float]) -> float:
        if isinstance(value, dict):  # r_k = Σ_c w_{k,c} v_c
            return sum(self.component_weights.get(f"{label}/{c}", 1.0) * v
                       for c, v in value.items())
        return value

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[Mapping[str, Any]],
              completion_ids: Sequence[Sequence[int]] | None = None,
              ) -> tuple[list[float], dict[str, float]]:
        """Returns (r per completion, metrics).

        Metrics: `reward/<label>` (mean of r_k over the calls that succeeded),
        `reward/<label>/<component>`, `rewards/failures_<kind>` (counts),
        `rewards/failures` and `rewards/failure_frac`, `rewards/call_s_max`.

        Raises:
          RewardFailureError: more than `max_failure_fraction` of the calls failed.
        """
        n = len(completions)
        if not (len(prompts) == len(rows) == n) or (
                completion_ids is not None and len(completion_ids) != n):
            raise ValueError(
                f"score: {len(prompts)} prompts, {n} completions, {len(rows)} rows"
                + (f", {len(completion_ids)} id lists" if completion_ids is not None else "")
                + " (fix: pass one of each per completion)")
        ids = [list(map(int, x)) for x in completion_ids] if completion_ids is not None else None
        calls = [Call(k, prompts[i], completions[i], ids[i] if ids else None, rows[i])
                 for k in range(len(self.specs)) for i in range(n)]
        outcomes = self.backend.run(calls) if calls else []

        totals = [0.0] * n
        metrics: dict[str, float] = {}
        failures = dict.fromkeys(FAILURE_KINDS, 0)
        example: tuple[Call, Outcome] | None = None
        for k, spec in enumerate(self.specs):
            ok_values: list[float] = []
            comps: dict[str, list[float]] = {}
            for i in range(n):
                call, out = calls[k * n + i], outcomes[k * n + i]
                if out.kind == "ok":
                    assert out.value is not None
                    r = self._combine(spec.label, out.value)
                    ok_values.append(r)
                    if isinstance(out.value, dict):
                        for c, v in out.value.items():
                            comps.setdefault(c, []).append(v)
                else:
                    r = self.fallback_score
                    failures[out.kind] += 1
                    example = example or (call, out)
                totals[i] += spec.weight * r
            metrics[f"reward/{spec.label}"] = _mean(ok_values)
            for c, vs in comps.items():
                metrics[f"reward/{spec.label}/{c}"] = _mean(vs)
        n_failed = sum(failures.values())
        for kind, count in failures.items():
            metrics[f"rewards/failures_{kind}"] = float(count)
        metrics["rewards/failures"] = float(n_failed)
        metrics["rewards/failure_frac"] = n_failed / max(len(calls), 1)
        metrics["rewards/call_s_max"] = max((o.elapsed_s for o in outcomes), default=0.0)
        if calls and n_failed / len(calls) > self.max_failure_fraction:
            assert example is not None
            raise RewardFailureError(self._failure_message(failures, len(calls), *example))
        return totals, metrics

    def _failure_message(self, failures: dict[str, int], n_calls: int, call: Call,
                         out: Outcome) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in failures.items() if v)
        n_failed = sum(failures.values())
        return (
            f"{n_failed}/{n_calls} reward calls failed ({counts}), more than "
            f"rewards.max_failure_fraction={self.max_failure_fraction}.\n"
            f"Example: reward {self.specs[call.fn_index].label!r} ({out.kind}) on prompt "
            f"{_clip(call.prompt)!r}, completion {_clip(call.completion)!r}:\n"
            f"{out.detail.rstrip()}\n"
            f"(fix: repair the reward, raise rewards.timeout_s, or raise "
            f"rewards.max_failure_fraction to tolerate failures at "
            f"rewards.fallback_score={self.fallback_score})"
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
