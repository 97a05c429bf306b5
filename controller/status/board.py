"""What the training loop publishes and the status server reads.

The loop (one thread) writes; the gRPC status server reads. The server runs in its own process
(controller/status/process.py) and answers from a mirror of this board, a second `StatusBoard`
that `apply` keeps up to date from the updates `attach_mirror` sends. The contract that keeps
the loop fast:

- `set_phase` and `publish_step` build a new frozen `StatusSnapshot` and swap one reference.
  They never wait for a reader: the only lock they take guards an append and a notify.
  `publish_eval` swaps one reference to a frozen `StepRecord` and takes no lock at all.
- The loop's cost per step does not depend on how many readers there are. The records are one
  shared ring (a bounded deque) that every watcher reads; `publish_step` wakes at most one
  waiting reader, and each woken reader wakes the next (`wait_records`).
- Readers get immutable objects (`StatusSnapshot`, `StepRecord`), so they can format replies
  at leisure while the loop moves on.
- Requests from outside (stop, checkpoint) are `threading.Event`s the loop polls between steps.
- With a mirror attached, every change also queues one small update, sent by whichever thread
  holds the mirror's lock (`_changed`): a thread that finds it held leaves its update to the
  holder, so no writer waits, not even a signal handler that interrupts a send on its own
  thread. An update carries the board's state when it is sent, so the mirror ends at the latest
  state whatever order concurrent writers queue in.

This module imports neither JAX nor gRPC, so the Job can keep a board even without a server.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any


class Phase(enum.Enum):
    """What the controller is doing; values match `tandem.v1.Phase` names, lower-cased."""

    STARTING = "starting"
    SAMPLING = "sampling"
    SCORING = "scoring"
    TRAINING = "training"
    SYNCING = "syncing"
    CHECKPOINTING = "checkpointing"
    IDLE = "idle"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.STOPPED, Phase.FAILED)


@dataclass(frozen=True)
class StatusSnapshot:
    """The controller's state at one instant; replaced (never mutated) on every change."""

    phase: Phase
    step: int  # completed steps
    policy_version: int  # optimizer updates reflected in the sampler's weights
    last_error: str
    phase_since: float  # time.time() when this phase began
    updated_at: float


@dataclass(frozen=True, eq=False)  # identity hash: readers may cache per record
class StepRecord:
    """One completed step's metrics (or one evaluation's), as published."""

    seq: int  # 0, 1, 2, ... in publish order (steps may start above 1 after a resume)
    step: int  # for an evaluation: the training step whose policy was evaluated (0 = before)
    time_unix: float
    values: Mapping[str, float]


@dataclass(frozen=True)
class MetricStats:
    mean: float
    std: float  # population std: sqrt(mean((x - mean)^2))
    min: float
    max: float
    count: int


class WatcherBehind(RuntimeError):
    """A watcher asked for records the board no longer keeps (more than `history` behind)."""


def window_stats(records: list[StepRecord]) -> dict[str, MetricStats]:
    """Per-key mean / std / min / max over `records`, NaNs excluded (count says how many).

    mean = fsum(x) / n and std = sqrt(fsum((x - mean)^2) / n), both correctly rounded sums.
    """
    cols: dict[str, list[float]] = {}
    for r in records:
        for k, v in r.values.items():
            if v == v:  # not NaN (the one value unequal to itself); cheaper than math.isnan
                col = cols.get(k)
                if col is None:
                    cols[k] = [v]
                else:
                    col.append(v)
    fsum, sqrt = math.fsum, math.sqrt
    out = {}
    for k, xs in cols.items():
        n = len(xs)
        mu = fsum(xs) / n
        out[k] = MetricStats(mu, sqrt(fsum([(x - mu) ** 2 for x in xs]) / n), min(xs), max(xs),
                             n)
    return out


@dataclass
class StatusBoard:
    """The loop's published state plus the requests the status server passes in.

    Args:
        job_id, run_name, config_digest, total_steps: static facts about the job.
        history: how many step records to keep for windows and watch replay.
    """

    job_id: str
    run_name: str
    config_digest: str
    total_steps: int
    history: int = 10_000
    start_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        now = time.time()
        self._snapshot = StatusSnapshot(Phase.STARTING, 0, 0, "", now, now)
        self._records: deque[StepRecord] = deque(maxlen=self.history)
        self._total = 0  # records ever published; the next record's seq
        self._cond = threading.Condition()
        self._waiting = 0  # readers blocked in wait_records now
        self._closed = False
        self._latest_eval: StepRecord | None = None
        self._evals = 0  # evaluations ever published; the next one's seq
        # Readers woken by publish_step: at most one per step, however many wait (tests check).
        self.publisher_wakeups = 0
        # Orders the loop's "begin a step" against stop/checkpoint requests, so the step a
        # request names in its reply is the step it really takes effect after.
        self._request_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.checkpoint_event = threading.Event()
        self._checkpoint_hook: Callable[[int], Any] | None = None
        self._listeners: list[Callable[[Phase], Any]] = []
        # The mirror: `send(update)`, the updates queued for it, and the lock its sender holds.
        self._mirror: Callable[[tuple], Any] | None = None
        self._outbox: deque[tuple[str, StepRecord | None]] = deque()
        self._mirror_lock = threading.Lock()

    # -- written by the loop's thread --------------------------------------------------------

    @property
    def snapshot(self) -> StatusSnapshot:
        return self._snapshot  # one reference read: always a complete, consistent snapshot

    def set_phase(self, phase: Phase | str, *, error: str | None = None) -> None:
        """Publishes a phase change (and, with `error`, the last error)."""
        phase = Phase(phase)
        old = self._snapshot
        if phase is old.phase and error is None:
            return
        now = time.time()
        self._swap(replace(old, phase=phase, phase_since=now, updated_at=now,
                           last_error=old.last_error if error is None else error))
        self._changed("snapshot")

    def _swap(self, new: StatusSnapshot) -> None:
        old, self._snapshot = self._snapshot, new
        if new.phase.terminal != old.phase.terminal:
            for fn in self._listeners:
                fn(new.phase)

    @property
    def checkpoint_hook(self) -> Callable[[int], Any] | None:
        """`hook(step)` saves a checkpoint as of `step`; None: checkpointing not configured."""
        return self._checkpoint_hook

    @checkpoint_hook.setter
    def checkpoint_hook(self, hook: Callable[[int], Any] | None) -> None:
        self._checkpoint_hook = hook
        self._changed("requests")

    def begin_step(self, honor_stop: bool) -> tuple[bool, bool]:
        """Called by the loop before each step: -> (go, checkpoint_first).

        go is False when `honor_stop` and a stop was requested. checkpoint_first is True (and
        the request is consumed) when a checkpoint was requested since the last step; the
        phase is then CHECKPOINTING, else SAMPLING.
        """
        with self._request_lock:
            if honor_stop and self.stop_event.is_set():
                return False, False
            ckpt = self.checkpoint_event.is_set()
            self.checkpoint_event.clear()
            self.set_phase(Phase.CHECKPOINTING if ckpt else Phase.SAMPLING)
        if ckpt:
            self._changed("requests")
        return True, ckpt

    def take_checkpoint_request(self) -> bool:
        """Consumes a pending checkpoint request (at the end of a run); True if there was one."""
        with self._request_lock:
            pending = self.checkpoint_event.is_set()
            self.checkpoint_event.clear()
        if pending:
            self._changed("requests")
        return pending

    def _next_boundary(self) -> int:
        # IDLE/STARTING: the next boundary is right after the last completed step; inside a
        # step (or the checkpoint before it): after that step.
        s = self._snapshot
        return s.step + (0 if s.phase in (Phase.IDLE, Phase.STARTING) else 1)

    def request_stop(self, reason: str) -> tuple[bool, int, str]:
        """A graceful stop: -> (accepted, after_step, message). Safe from any thread."""
        with self._request_lock:
            s = self._snapshot
            if s.phase.terminal:
                return False, s.step, f"the job has already {s.phase.value}"
            first = not self.stop_event.is_set()
            if first:
                self.stop_reason = reason
                self.stop_event.set()
            after = self._next_boundary()
        if first:
            self._changed("requests")
        ckpt = " and save a checkpoint" if self.checkpoint_hook is not None else ""
        return True, after, f"the job will finish step {after}{ckpt}, then stop"

    def request_checkpoint(self) -> tuple[bool, int, str]:
        """-> (accepted, after_step, message); not accepted without a checkpoint hook."""
        if self.checkpoint_hook is None:
            return False, self._snapshot.step, (
                "checkpointing is not configured for this job, so no checkpoint can be taken "
                "(fix: register a checkpoint hook with Job.set_checkpoint_hook(fn))")
        with self._request_lock:
            s = self._snapshot
            if s.phase.terminal:
                return False, s.step, f"the job has {s.phase.value}; no step will follow"
            self.checkpoint_event.set()
            after = self._next_boundary()
        self._changed("requests")
        return True, after, f"a checkpoint will be saved after step {after}"

    def publish_step(self, step: int, metrics: Mapping[str, float], policy_version: int) -> None:
        """Publishes a completed step: a new snapshot (phase IDLE) and a record for watchers."""
        now = time.time()
        record = StepRecord(self._total, int(step), now, MappingProxyType(dict(metrics)))
        self._append(record)
        self._swap(StatusSnapshot(Phase.IDLE, int(step), int(policy_version),
                                  self._snapshot.last_error, now, now))
        self._changed("step", record)

    def _append(self, record: StepRecord) -> None:
        with self._cond:  # held for an append and a notify; readers copy outside it
            self._records.append(record)
            self._total += 1
            # Wake one reader, not all: it wakes the next on its own thread (wait_records), so
            # this costs the loop the same for 1 watcher or 100.
            if self._waiting:
                self._cond.notify(1)
                self.publisher_wakeups += 1

    def publish_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Publishes a held-out evaluation of the policy after `step` (0 = before training).

        Args:
            step: the training step whose policy was evaluated.
            metrics: "eval/..." keys (e.g. eval/accuracy, eval/pass@4) -> value; each value
                must convert with float().

        Only the latest evaluation is kept; it replaces the previous one with a single
        reference swap, so readers always see one whole evaluation and the loop never waits.
        """
        values = MappingProxyType({str(k): float(v) for k, v in metrics.items()})
        record = StepRecord(self._evals, int(step), time.time(), values)
        self._evals += 1  # only the loop's thread publishes, so no lock
        self._latest_eval = record
        self._changed("eval")

    def close(self) -> None:
        """No more steps: open watch streams drain what is left and end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._changed("close")

    def add_listener(self, fn: Callable[[Phase], Any]) -> None:
        """`fn(phase)` runs (on the loop's thread) when the job enters or leaves a terminal
        phase (stopped/failed); the server uses it to flip health to NOT_SERVING and back."""
        self._listeners.append(fn)

    # -- the mirror in the status server's process ------------------------------------------

    def attach_mirror(self, send: Callable[[tuple], Any]) -> None:
        """Sends `send` this board's state, then one update per change, in order.

        Each update is a small tuple of plain values and frozen snapshots (it pickles), which
        `apply` on a board with the same job facts turns into the same state. `send` must not
        block or raise: it runs on whichever thread made the change (the loop's, usually).
        """
        with self._mirror_lock:
            self._mirror = send  # first: a change made from here on is queued, not missed
            with self._cond:
                records = [_plain(r) for r in self._records]
                total = self._total
            send(("records", total, records))
            for kind in ("snapshot", "eval", "requests", *(("close",) if self._closed else ())):
                send(self._update(kind, None))
        self._send_queued()  # what other threads queued meanwhile

    def detach_mirror(self) -> None:
        """Stops sending updates (those queued are dropped)."""
        with self._mirror_lock:
            self._mirror = None
            self._outbox.clear()

    def _changed(self, kind: str, record: StepRecord | None = None) -> None:
        if self._mirror is None:
            return
        self._outbox.append((kind, record))
        self._send_queued()

    def _send_queued(self) -> None:
        # Whoever holds the lock sends every queued update, re-checking after it lets go; a
        # writer that finds the lock held returns at once and leaves its update to the holder.
        while self._outbox and self._mirror_lock.acquire(blocking=False):
            try:
                while self._outbox:
                    kind, record = self._outbox.popleft()
                    send = self._mirror
                    if send is not None:
                        send(self._update(kind, record))
            finally:
                self._mirror_lock.release()

    def _update(self, kind: str, record: StepRecord | None) -> tuple:
        # The state as it is now (not as it was when queued): the last update sent is current.
        if kind == "snapshot":
            return ("snapshot", self._snapshot)
        if kind == "step":
            return ("step", _plain(record), self._snapshot)
        if kind == "eval":
            ev = self._latest_eval
            return ("eval", None if ev is None else _plain(ev))
        if kind == "requests":
            return ("requests", self.stop_event.is_set(), self.stop_reason,
                    self.checkpoint_event.is_set(), self._checkpoint_hook is not None)
        return (kind,)  # "close"

    def apply(self, update: tuple) -> None:
        """Applies one update from `attach_mirror` (on the mirror, in the order sent)."""
        kind = update[0]
        if kind == "snapshot":
            self._swap(update[1])
        elif kind == "step":
            record = _record(update[1])
            if record.seq == self._total:  # else already in the initial "records"
                self._append(record)
            self._swap(update[2])
        elif kind == "records":
            with self._cond:
                self._records.clear()
                self._records.extend(_record(r) for r in update[2])
                self._total = update[1]
                self._cond.notify_all()
        elif kind == "eval":
            self._latest_eval = None if update[1] is None else _record(update[1])
        elif kind == "requests":
            stop, self.stop_reason, ckpt, configured = update[1:]
            for event, on in ((self.stop_event, stop), (self.checkpoint_event, ckpt)):
                if on:
                    event.set()
                else:
                    event.clear()
            # The hook itself stays in the controller; the mirror only knows that there is one.
            self._checkpoint_hook = _checkpoint_elsewhere if configured else None
        elif kind == "close":
            self.close()
        else:
            raise ValueError(f"unknown status board update {kind!r}")

    # -- read by the server's threads --------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def latest(self) -> StepRecord | None:
        records = self._records
        return records[-1] if records else None

    def latest_eval(self) -> StepRecord | None:
        """The latest published evaluation, or None before the first."""
        return self._latest_eval  # one reference read: a whole evaluation

    def window(self, n: int) -> list[StepRecord]:
        """The last `n` published records (fewer before `n` steps have completed)."""
        return self.window_at(n)[1]

    def window_at(self, n: int) -> tuple[int, list[StepRecord]]:
        """(published, the last `n` records), read together: the window ends at `published`."""
        with self._cond:
            n = min(n, len(self._records))
            return self._total, [self._records[i]
                                 for i in range(len(self._records) - n, len(self._records))]

    @property
    def published(self) -> int:
        """How many step records have been published (the next record's seq)."""
        return self._total

    def first_seq_at(self, step: int) -> int:
        """The seq of the first retained record with step >= `step` (or the next one)."""
        with self._cond:
            for r in self._records:
                if r.step >= step:
                    return r.seq
            return self._total

    def wait_records(self, next_seq: int, timeout: float,
                     cancelled: Callable[[], bool] = lambda: False) -> list[StepRecord]:
        """Records with seq >= next_seq, waiting up to `timeout` s for the first of them.

        Returns [] on timeout, on `cancelled()`, or when the board is closed and drained.
        Raises WatcherBehind if record `next_seq` has already been dropped from the history.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            waited = False
            while self._total <= next_seq and not self._closed and not cancelled():
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
                waited = True
            if waited and self._total > next_seq and self._waiting:
                # publish_step woke one reader; each reader woken to new records wakes the next.
                # Waiters queue in order, so this record's readers come before any that already
                # wait for the next record (where the chain stops). Woken one at a time, they do
                # not all contend for this lock and the GIL at once, and the loop's thread wakes
                # one reader however many wait.
                self._cond.notify(1)
            oldest = self._total - len(self._records)
            if next_seq < oldest:
                raise WatcherBehind(
                    f"this watcher is {self._total - next_seq} steps behind, more than the "
                    f"status.history={self.history} steps the job keeps (fix: reconnect, or "
                    f"raise status.history)")
            start = next_seq - oldest
            return [self._records[i] for i in range(start, len(self._records))]

    def wake(self) -> None:
        """Wakes every waiting watcher (e.g. one whose client went away)."""
        with self._cond:
            self._cond.notify_all()

    def uptime(self) -> float:
        return time.time() - self.start_time


def _plain(r: StepRecord) -> tuple:
    """A record as plain values (a MappingProxyType does not pickle)."""
    return r.seq, r.step, r.time_unix, dict(r.values)


def _record(t: tuple) -> StepRecord:
    seq, step, time_unix, values = t
    return StepRecord(seq, step, time_unix, MappingProxyType(values))


def _checkpoint_elsewhere(step: int) -> None:
    """A mirror's stand-in for the controller's checkpoint hook (never called there)."""
    raise RuntimeError("a mirrored status board cannot take checkpoints; the controller does")
