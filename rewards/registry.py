"""A job's rewards: functions named by spec, combined with weights, scored on a backend.

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

This module is the package's front: `RewardSet` scores a batch, `build_specs` reads the config's
reward list, `build_backend` picks where calls run. It builds on the modules below it, which
never import it back:

    base.py         errors, Call, Outcome, BoundReward, RewardSpec, the Backend protocol
    builtin.py      the built-in reward functions (plain functions)
    lookup.py       spec -> function: the built-in table, registered names, module:function, files
    pool.py         LocalBackend (in-process) and ProcessPool (worker processes)
    ray_backend.py  RayBackend (Ray actors)
    synthetic.py    the synthetic benchmark task's reward (standard library only)
    tools.py        tools for multi-turn rollouts: JSON schemas, Hermes calls, ToolCall
    environments.py environments (multi-turn), the built-ins, run_tool_call (what a worker runs)
    sandbox.py      run_python: untrusted code in a sandboxed subprocess, which starts by
                    running _sandbox_boot.py as a script (it is never imported)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewards.base import (
    FAILURE_KINDS,
    Backend,
    Call,
    Outcome,
    RewardError,
    RewardFailureError,
    RewardSpec,
)
from rewards.lookup import (
    get_reward,
    normalize_spec,
    register_reward,
    registered_rewards,
    reward_label,
)
from rewards.pool import LocalBackend, ProcessPool

if TYPE_CHECKING:
    from controller.config import RewardsConfig

# The names code outside `rewards` imports from here; some are defined in the modules below.
__all__ = [
    "RewardError",
    "RewardFailureError",
    "RewardSet",
    "build_backend",
    "build_specs",
    "build_tool_backend",
    "get_reward",
    "register_reward",
    "registered_rewards",
]


def build_specs(functions: Sequence[str], weights: Sequence[float] | None = None,
                kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> list[RewardSpec]:
    """Resolves labels (duplicates get "_2", "_3") and checks kwargs name a known label."""
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


def build_backend(cfg: RewardsConfig, specs: Sequence[RewardSpec]) -> Backend:
    """The backend `rewards.backend` names, for the given reward specs."""
    if cfg.backend == "local":
        return LocalBackend(specs, timeout_s=cfg.timeout_s)
    if cfg.backend == "process":
        return ProcessPool(specs, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                           max_calls_per_worker=cfg.worker_max_calls)
    # Imported here: importing Ray is slow, and only this backend needs it.
    from rewards.ray_backend import RayBackend

    return RayBackend(specs, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                      address=cfg.ray_address, num_cpus=cfg.ray_num_cpus)


def build_tool_backend(cfg: RewardsConfig, rewards: RewardSet) -> tuple[Backend, bool]:
    """Where tool calls (rewards/tools.py) run, and whether the caller owns (must close) it:
    the reward set's own workers for `process` and `ray`; for `local`, worker processes of
    their own (`rewards.num_workers`), so that a tool that hangs is killed at
    `rewards.timeout_s` from any thread, not only the main one."""
    if cfg.backend == "local":
        return ProcessPool([], num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                           max_calls_per_worker=cfg.worker_max_calls), True
    return rewards.backend, False


@dataclass(frozen=True)
class Scores:
    """What `RewardSet.score_each` returns for N completions."""

    totals: list[float]  # r = Σ_k w_k r_k per completion
    each: dict[str, list[float]]  # label -> r_k per completion (fallback_score where it failed)
    metrics: dict[str, float]  # as `RewardSet.score` describes


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
            backend = LocalBackend(self.specs, timeout_s=timeout_s)
        self.backend = backend

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> RewardSet:
        """The reward set and backend that `cfg` (a `RewardsConfig`) describes."""
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
        s = self.score_each(prompts, completions, rows, completion_ids)
        return s.totals, s.metrics

    def score_each(self, prompts: Sequence[str], completions: Sequence[str],
                   rows: Sequence[Mapping[str, Any]],
                   completion_ids: Sequence[Sequence[int]] | None = None, *,
                   tolerate_failures: bool = False) -> Scores:
        """As `score`, with each function's r_k per completion too. With `tolerate_failures`
        (evaluation), failed calls are counted in the metrics and score `fallback_score`, and
        nothing is raised."""
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
        each: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        failures = dict.fromkeys(FAILURE_KINDS, 0)
        example: tuple[Call, Outcome] | None = None
        for k, spec in enumerate(self.specs):
            ok_values: list[float] = []
            comps: dict[str, list[float]] = {}
            values = each[spec.label] = []
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
                values.append(r)
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
        if (not tolerate_failures and calls
                and n_failed / len(calls) > self.max_failure_fraction):
            assert example is not None
            raise RewardFailureError(self._failure_message(failures, len(calls), *example))
        return Scores(totals, each, metrics)

    def _failure_message(self, failures: dict[str, int], n_calls: int, call: Call,
                         out: Outcome) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in failures.items() if v)
        n_failed = sum(failures.values())
        return (
            f"{n_failed}/{n_calls} reward calls failed ({counts}), more than "
            f"rewards.max_failure_fraction={self.max_failure_fraction}.\n"
            f"Example: reward {self.specs[call.fn_index].label!r} ({out.kind}) on prompt "
            f"{_clip(call.prompt)!r}, completion {_clip(call.completion)!r}:\n"
            f"{_user_frames(out.detail).rstrip()}\n"
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


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frames(detail: str) -> str:
    """A reward's traceback without the frames of this package (the call wrapper), so what
    is shown is the user's own code."""
    lines, out, skipping = detail.splitlines(), [], False
    for line in lines:
        m = re.match(r'  File "(.+?)", line \d+', line)
        if m:
            skipping = os.path.abspath(m.group(1)).startswith(_PACKAGE_DIR + os.sep)
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    if not any(x.startswith('  File "') for x in out):  # nothing of the user's: no header
        out = [x for x in out if x != "Traceback (most recent call last):"]
    return "\n".join(out)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
