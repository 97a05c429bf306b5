"""Metric keys, the per-run history, and sinks (JSONL file, console summary).

Keys are `group/name_unit`: `reward/mean`, `loss/policy`, `time/sample_s`, `reshard/gbps`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Any


class MetricsLog:
    """Every step's metrics, in order; appended to `<output_dir>/metrics.jsonl` when set."""

    def __init__(self, output_dir: str | None = None, *, resume_step: int | None = None):
        """With `resume_step`, keeps the logged steps <= resume_step and drops the rest (they
        will be run again), so the log has every step exactly once."""
        self.history: list[dict[str, float]] = []
        self._file = None
        if output_dir:
            path = Path(output_dir)
            path.mkdir(parents=True, exist_ok=True)
            file = path / "metrics.jsonl"
            if resume_step is not None and file.exists():
                for line in file.read_text().splitlines():
                    try:
                        m = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by a kill
                    if m.get("step", 0) <= resume_step:
                        self.history.append(m)
                tmp = file.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
                tmp.replace(file)  # atomic: a kill here leaves the old or the new log
            self._file = file.open("a")

    def append(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        if self._file is not None:
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self, window: int = 10) -> dict[str, Any]:
        """First vs last `window` steps' reward, step time (compile excluded), sync bandwidth."""
        h = self.history
        if not h:
            return {}
        w = min(window, len(h))
        steady = h[1:] if len(h) > 1 else h  # step 1 includes compilation
        return {
            "steps": len(h),
            "reward_first": mean(m["reward/mean"] for m in h[:w]),
            "reward_last": mean(m["reward/mean"] for m in h[-w:]),
            "window": w,
            "step_s_mean": mean(m["time/step_s"] for m in steady),
            "first_step_s": h[0]["time/step_s"],
            "reshard_gbps": mean(m["reshard/gbps"] for m in steady),
            "reshard_bytes": h[-1]["reshard/bytes"],
        }


def to_float(value: Any) -> float:
    f = float(value)
    return f if math.isfinite(f) else float("nan")
