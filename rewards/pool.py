"""Where reward calls run: in this process, or in a pool of worker processes with timeouts.

`ProcessPool` is the backend for rewards you do not trust to return: each worker is a spawned
process (not forked: the controller holds JAX threads) that resolves the reward specs itself and
runs a chunk of calls at a time, sending one result per call. The parent gives every call
`timeout_s` from the moment the previous result of that worker arrived (or the chunk was sent),
so a hung call is detected within its timeout, not the chunk's. On a timeout or a worker's
death the parent kills the worker's whole process group, records the call as "timeout" or
"crash", puts the rest of the chunk back in the queue and starts a replacement worker. The
controller therefore never waits on a hung call beyond `timeout_s`.

`LocalBackend` runs calls in the controller process: no process start-up or pickling, but a
call can only be cut at its timeout when it runs pure-Python code on the main thread (SIGALRM);
use it for rewards you trust, such as the built-ins.

`rewards.registry.build_backend` picks one of these (or `rewards.ray_backend.RayBackend`) from
the config.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rewards.base import BoundReward, Call, Outcome, RewardError, RewardSpec
from rewards.environments import run_tool_call
from rewards.lookup import resolve_all
from rewards.tools import ToolCall

_STARTUP_TIMEOUT_S = 120.0  # a worker that cannot import its rewards in this long is an error
_MAX_STARTUP_DEATHS = 5  # workers dying before they are up this often is an error


# ---------------------------------------------------------------------------------------------
# In-process


def run_call(fns: Sequence[BoundReward], call: Call | ToolCall) -> Outcome:
    """One call in this process: a reward function on a completion, or a tool call (see
    rewards/tools.py); never raises for the user code's own errors."""
    if isinstance(call, ToolCall):
        return run_tool_call(call)
    return fns[call.fn_index].call(call)


class _CallTimeout(BaseException):  # BaseException: a reward's `except Exception` can't eat it
    pass


class LocalBackend:
    """Runs calls one after another in this process.

    A call that overruns `timeout_s` is interrupted by SIGALRM when this is the main thread;
    code stuck in C (a sleep in a C extension, a deadlock) cannot be interrupted here.
    """

    def __init__(self, specs: Sequence[RewardSpec], *, timeout_s: float | None = None):
        self.fns = resolve_all(specs, warmup=True)
        self.timeout_s = timeout_s

    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        use_alarm = (self.timeout_s is not None and hasattr(signal, "setitimer")
                     and threading.current_thread() is threading.main_thread())
        if not use_alarm:
            return [run_call(self.fns, c) for c in calls]

        def on_alarm(signum: int, frame: Any) -> None:
            raise _CallTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        out = []
        try:
            for c in calls:
                t0 = time.perf_counter()
                try:
                    signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
                    try:
                        res = run_call(self.fns, c)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except _CallTimeout:
                    res = Outcome("timeout", None,
                                  f"timed out after rewards.timeout_s={self.timeout_s}",
                                  time.perf_counter() - t0)
                out.append(res)
        finally:
            signal.signal(signal.SIGALRM, previous)
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(conn: Connection, specs: list[RewardSpec]) -> None:
    """A worker: resolve the rewards, then run chunks of calls, one result message per call."""
    os.setpgrp()  # its own process group: killing the group also kills what the reward spawned
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the controller's to handle
    try:
        fns = resolve_all(specs, warmup=True)
    except BaseException as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return  # the controller went away
        if chunk is None:
            return
        for call_id, call in chunk:
            conn.send((call_id, run_call(fns, call)))


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)
    inflight: deque[int] = field(default_factory=deque)  # call ids, in the order they run
    deadline: float = math.inf
    calls_done: int = 0


class ProcessPool:
    """Scores calls in `num_workers` spawned processes with a hard per-call timeout.

    Args:
      specs: the rewards; each worker resolves them itself (so they must be importable there).
      num_workers: worker processes.
      timeout_s: per-call limit; past it the worker is killed and replaced.
      max_calls_per_worker: recycle a worker after this many calls (leaky rewards); None: never.
      chunk_size: calls sent to a worker at once (None: about 4 chunks per worker per batch).
    """

    def __init__(self, specs: Sequence[RewardSpec], *, num_workers: int = 2,
                 timeout_s: float = 10.0, max_calls_per_worker: int | None = None,
                 chunk_size: int | None = None):
        if timeout_s <= 0:
            raise RewardError(f"rewards.timeout_s={timeout_s}: must be > 0 "
                              f"(e.g. rewards.timeout_s=30)")
        if num_workers < 1:
            raise RewardError(f"rewards.num_workers={num_workers}: must be >= 1")
        resolve_all(specs)  # fail here, in the controller, on a typo, not in every worker
        self.specs = list(specs)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_calls_per_worker = max_calls_per_worker
        self.chunk_size = chunk_size
        self._ctx = mp.get_context("spawn")
        self.workers_started = 0
        self.workers_replaced = 0
        self._startup_deaths = 0
        self._workers = [self._start() for _ in range(num_workers)]
        self._closed = False

    @property
    def processes(self) -> list[Any]:
        """The current worker processes (`multiprocessing.Process`), one per slot."""
        return [w.proc for w in self._workers]

    # -- worker lifecycle -------------------------------------------------------------------

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.specs), daemon=True,
                                 name="tandem-reward-worker")
        proc.start()
        child.close()
        self.workers_started += 1
        return _Worker(proc, parent)

    @staticmethod
    def _kill(w: _Worker) -> None:
        # The worker made itself a process-group leader; SIGKILL the group (its children too).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, i: int) -> None:
        self._kill(self._workers[i])
        self._workers[i] = self._start()
        self.workers_replaced += 1

    def _on_startup_message(self, i: int) -> None:
        w = self._workers[i]
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            # Killed from outside (or out of memory) before it was up: try again, a few times.
            w.proc.join(timeout=5)
            self._startup_deaths += 1
            if self._startup_deaths > _MAX_STARTUP_DEATHS:
                raise RewardError(
                    f"reward workers keep dying while starting ({self._startup_deaths} times, "
                    f"last exit code {w.proc.exitcode})") from None
            self._replace(i)
            return
        if kind == "init_error":
            raise RewardError(f"a reward worker could not load the rewards: {payload}")
        w.ready = True

    # -- scoring ----------------------------------------------------------------------------

    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        """One Outcome per call, in order; returns within about timeout_s of the slowest call."""
        if self._closed:
            raise RewardError("the reward pool is closed")
        results: list[Outcome | None] = [None] * len(calls)
        pending: deque[int] = deque(range(len(calls)))
        chunk = self.chunk_size or max(1, min(64, math.ceil(len(calls) / (4 * self.num_workers))))
        for i, w in enumerate(self._workers):  # a worker may have died between batches
            if w.ready and not w.proc.is_alive():
                self._replace(i)

        while pending or any(w.inflight for w in self._workers):
            now = time.monotonic()
            # DISPATCH: a chunk to every ready, idle worker.
            for i, w in enumerate(self._workers):
                if w.ready and not w.inflight and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    try:
                        w.conn.send([(j, calls[j]) for j in ids])
                    except OSError:  # it died while idle: no call to blame, start another
                        pending.extendleft(reversed(ids))
                        self._replace(i)
                        continue
                    w.inflight.extend(ids)
                    w.deadline = now + self.timeout_s
            # WAIT: for a result, a death (EOF) or the earliest deadline.
            waiting = [w for w in self._workers if w.inflight or not w.ready]
            soonest = min((w.deadline if w.ready else w.started_at + _STARTUP_TIMEOUT_S)
                          for w in waiting)
            ready_conns = wait([w.conn for w in waiting], timeout=max(0.0, soonest - now))
            for i, w in enumerate(self._workers):
                if w.conn not in ready_conns:
                    continue
                if not w.ready:
                    self._on_startup_message(i)
                    continue
                try:
                    while w.conn.poll():  # drain every result that arrived
                        call_id, outcome = w.conn.recv()
                        assert call_id == w.inflight[0], (call_id, w.inflight)
                        w.inflight.popleft()
                        results[call_id] = outcome
                        w.calls_done += 1
                        w.deadline = time.monotonic() + self.timeout_s
                except (EOFError, OSError):
                    if w.inflight:
                        self._fail_worker(i, results, pending, "crash")
                    else:  # it died after its last result: nothing lost, start another
                        self._replace(i)
                    continue
                if (not w.inflight and self.max_calls_per_worker is not None
                        and w.calls_done >= self.max_calls_per_worker):
                    self._replace(i)  # recycle: bounds what a leaky reward can accumulate
            # TIMEOUTS: the call at the head of a worker's queue is the one running.
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.inflight and now >= w.deadline:
                    self._fail_worker(i, results, pending, "timeout")
                elif not w.ready and now >= w.started_at + _STARTUP_TIMEOUT_S:
                    raise RewardError(f"a reward worker did not start in {_STARTUP_TIMEOUT_S}s")
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _fail_worker(self, i: int, results: list[Outcome | None], pending: deque[int],
                     kind: str) -> None:
        """Blames the running call, requeues the rest of the chunk, replaces the worker."""
        w = self._workers[i]
        call_id = w.inflight.popleft()
        started = w.deadline - self.timeout_s
        if kind == "timeout":
            detail = (f"the call ran past rewards.timeout_s={self.timeout_s}; its worker "
                      f"(pid {w.proc.pid}) was killed and replaced")
        else:
            w.proc.join(timeout=1)
            detail = (f"the worker (pid {w.proc.pid}) died during the call, exit code "
                      f"{w.proc.exitcode} (a negative code is the signal that killed it, e.g. "
                      f"-9 for the out-of-memory killer); it was replaced")
        results[call_id] = Outcome(kind, None, detail, time.monotonic() - started)
        pending.extendleft(reversed(w.inflight))
        w.inflight.clear()
        self._replace(i)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                self._kill(w)
            else:
                w.conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
