"""Reward calls on Ray actors: `rewards.backend=ray`, the same semantics as `ProcessPool`.

`num_workers` actors each resolve the reward specs (so the modules, or the files of file-path
rewards, must exist on the Ray nodes too). Every actor runs one call at a time; a call past
`timeout_s` gets its actor killed (`ray.kill`) and replaced, and is recorded as "timeout"; an
actor that dies mid-call is recorded as "crash" and replaced. Needs the `ray` extra
(`pip install tandem-rl[ray]`).

Connects to `rewards.ray_address` (e.g. "auto" or "ray://head:10001") if given, otherwise uses an
already-initialized Ray or starts a local one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from rewards.base import Call, Outcome, RewardError, RewardSpec
from rewards.lookup import resolve_all
from rewards.pool import run_call

try:
    import ray
except ImportError:  # pragma: no cover - exercised where ray is not installed
    ray = None


class _RewardActor:
    """Holds the resolved rewards; `run` scores one call."""

    def __init__(self, specs: list[RewardSpec]):
        self.fns = resolve_all(specs, warmup=True)

    def ready(self) -> bool:
        return True

    def run(self, call: Call) -> Outcome:
        return run_call(self.fns, call)  # a reward call or a tool call


class RayBackend:
    """Scores calls on `num_workers` Ray actors with a per-call timeout."""

    def __init__(self, specs: Sequence[RewardSpec], *, num_workers: int = 2,
                 timeout_s: float = 10.0, address: str | None = None, num_cpus: float = 1.0):
        if ray is None:
            raise RewardError(
                "rewards.backend=ray needs Ray (fix: pip install 'tandem-rl[ray]', or "
                "rewards.backend=process)")
        if timeout_s <= 0:
            raise RewardError(f"rewards.timeout_s={timeout_s}: must be > 0")
        resolve_all(specs)  # fail in the controller on a typo, not in every actor
        self._owns_ray = not ray.is_initialized()  # then close() shuts it down again
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=False)
        self.specs = list(specs)
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self._actor_cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(_RewardActor)
        self.workers_replaced = 0
        self._actors = [self._start() for _ in range(num_workers)]
        ray.get([a.ready.remote() for a in self._actors])  # surfaces import errors now
        self._closed = False

    def _start(self) -> Any:
        return self._actor_cls.remote(self.specs)

    def _replace(self, i: int) -> Any:
        """Kills actor i and starts another; returns the new actor's `ready` ref."""
        with contextlib.suppress(Exception):
            ray.kill(self._actors[i], no_restart=True)
        self._actors[i] = self._start()
        self.workers_replaced += 1
        return self._actors[i].ready.remote()

    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        """One Outcome per call, in order; no call is waited on beyond timeout_s once started."""
        if self._closed:
            raise RewardError("the Ray reward backend is closed")
        results: list[Outcome | None] = [None] * len(calls)
        next_call = 0
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (actor index, call id, t0)
        # A replacement actor gets calls only once it is up, so its start-up time is not
        # charged to a call's timeout.
        starting: dict[Any, int] = {}  # ready ref -> actor index
        idle = list(range(len(self._actors)))
        while next_call < len(calls) or running:
            while idle and next_call < len(calls):
                i = idle.pop()
                ref = self._actors[i].run.remote(calls[next_call])
                running[ref] = (i, next_call, time.monotonic())
                next_call += 1
            if not running:  # every actor is (re)starting
                done, _ = ray.wait(list(starting), num_returns=1)
                for ref in done:
                    idle.append(starting.pop(ref))
                continue
            now = time.monotonic()
            soonest = min(t0 + self.timeout_s for _, _, t0 in running.values())
            done, _ = ray.wait([*running, *starting], num_returns=1,
                               timeout=max(0.0, soonest - now))
            for ref in done:
                if ref in starting:
                    idle.append(starting.pop(ref))
                    continue
                i, call_id, t0 = running.pop(ref)
                try:
                    results[call_id] = ray.get(ref)
                    idle.append(i)
                except ray.exceptions.RayActorError as e:
                    results[call_id] = Outcome(
                        "crash", None, f"the reward actor died during the call: {e}",
                        time.monotonic() - t0)
                    starting[self._replace(i)] = i
                except ray.exceptions.RayError as e:
                    results[call_id] = Outcome("error", None, str(e), time.monotonic() - t0)
                    idle.append(i)
            now = time.monotonic()
            for ref, (i, call_id, t0) in list(running.items()):
                if now - t0 >= self.timeout_s:
                    running.pop(ref)
                    results[call_id] = Outcome(
                        "timeout", None, f"the call ran past rewards.timeout_s={self.timeout_s}; "
                        f"its actor was killed and replaced", now - t0)
                    starting[self._replace(i)] = i
        if starting:  # leave every actor up for the next batch
            ray.get(list(starting))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if self._owns_ray:
            ray.shutdown()
