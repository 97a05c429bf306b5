"""A per-step timeline of every phase, on the host clock, exportable as a Chrome trace.

Each span is (phase, mesh, step, start, end). `summary()` gives, per mesh, the fraction of the
wall time it was busy and idle, and the fraction in which both meshes were busy at once (the
overlap an async schedule exists to create). `write_chrome_trace(path)` writes the JSON that
chrome://tracing and Perfetto (ui.perfetto.dev) open: one row per mesh.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etils import epath

from controller.config import as_path

MESHES = ("sampler", "host", "trainer")


@dataclass(frozen=True)
class Span:
    phase: str  # sample, score, reference, update, reshard, wait
    mesh: str  # sampler, trainer, or host (Python work such as reward functions)
    step: int
    start: float  # time.perf_counter() seconds
    end: float


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]
               ) -> list[tuple[float, float]]:
    out = []
    for s1, e1 in a:
        for s2, e2 in b:
            s, e = max(s1, s2), min(e1, e2)
            if s < e:
                out.append((s, e))
    return out


class Timeline:
    """Thread-safe record of phase spans."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        # Called with (phase, mesh, step) as each span begins (the Job maps it to the status
        # board's phase); must return at once.
        self.on_span_start: Callable[[str, str, int], Any] | None = None

    def add(self, phase: str, mesh: str, step: int, start: float, end: float) -> None:
        with self._lock:
            self.spans.append(Span(phase, mesh, step, start, end))

    def span(self, phase: str, mesh: str, step: int) -> _SpanContext:
        """`with timeline.span("update", "trainer", step): ...` records the block's time."""
        return _SpanContext(self, phase, mesh, step)

    def summary(self, since_step: int = 1) -> dict[str, float]:
        """Busy/idle fraction per mesh and the both-busy overlap, over steps >= since_step.

        "wait" spans are idle time by definition and do not count as busy.
        """
        with self._lock:
            spans = [s for s in self.spans if s.step >= since_step and s.phase != "wait"]
        if not spans:
            return {}
        t0 = min(s.start for s in spans)
        t1 = max(s.end for s in spans)
        wall = max(t1 - t0, 1e-12)
        busy = {m: [(s.start, s.end) for s in spans if s.mesh == m] for m in MESHES}
        out = {"timeline/wall_s": wall}
        for m in ("sampler", "trainer"):
            frac = _union_length(busy[m]) / wall
            out[f"timeline/{m}_busy_frac"] = frac
            out[f"timeline/{m}_idle_frac"] = 1.0 - frac
        out["timeline/overlap_frac"] = _union_length(
            _intersect(busy["sampler"], busy["trainer"])) / wall
        return out

    def to_chrome_trace(self) -> dict[str, Any]:
        with self._lock:
            spans = list(self.spans)
        tids = {m: i for i, m in enumerate(MESHES)}
        events: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": m}}
            for m, tid in tids.items()
        ]
        for s in spans:
            events.append({
                "name": s.phase, "cat": s.mesh, "ph": "X", "pid": 1, "tid": tids[s.mesh],
                "ts": (s.start - self.origin) * 1e6, "dur": (s.end - s.start) * 1e6,
                "args": {"step": s.step},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str | os.PathLike) -> epath.Path:
        """Writes the trace to `path` (a local path or a gs:// URL)."""
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_chrome_trace()))
        return path


class _SpanContext:
    def __init__(self, timeline: Timeline, phase: str, mesh: str, step: int):
        self.timeline, self.phase, self.mesh, self.step = timeline, phase, mesh, step

    def __enter__(self) -> _SpanContext:
        if self.timeline.on_span_start is not None:
            self.timeline.on_span_start(self.phase, self.mesh, self.step)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end = time.perf_counter()
        self.timeline.add(self.phase, self.mesh, self.step, self.start, self.end)

    @property
    def seconds(self) -> float:
        return self.end - self.start
