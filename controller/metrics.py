"""Metric keys, the per-run history, and sinks (JSONL, TensorBoard, Weights & Biases).

Keys are `group/name_unit`: `reward/mean`, `loss/policy`, `time/sample_s`, `reshard/gbps`.
The console is the CLI's job (progress bar and periodic lines); everything else is a sink.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any, Protocol

from etils import epath

from controller.config import as_path, is_url
from controller.storage import upload_dir


class Sink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per step to <dir>/metrics.jsonl: appended and flushed each step to a
    local file; to a bucket (where an object cannot be appended to), the whole file is
    rewritten at most every `upload_every_s` seconds, on `flush()` (the job flushes with every
    checkpoint, so a resumed run finds every step up to its checkpoint) and on `close()`."""

    def __init__(self, path: epath.Path, *, upload_every_s: float = 30.0):
        self._remote = is_url(path)
        self._path = path
        self._upload_every_s = upload_every_s
        if self._remote:
            self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            self._dirty = False
            self._uploaded_at = time.monotonic()
        else:
            self._file = open(os.fspath(path), "a")  # noqa: SIM115 - open for the sink's life

    def write(self, step: int, metrics: dict[str, float]) -> None:
        line = json.dumps(metrics) + "\n"
        if not self._remote:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            self._path.write_text("".join(self._lines))
            self._dirty = False
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()


class TensorBoardSink:
    """Scalars to TensorBoard event files (tensorboardX). For a bucket, the events are written
    to a local directory and copied up on `flush()` and `close()`."""

    def __init__(self, directory: epath.Path, *, upload_every_s: float = 30.0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("run.tensorboard=true needs tensorboardX: pip install "
                              "tensorboardX") from e
        self._remote = directory if is_url(directory) else None
        self._upload_every_s = upload_every_s
        self._uploaded_at = time.monotonic()
        if self._remote is not None:
            self._local = tempfile.mkdtemp(prefix="tandem-tensorboard-")
        else:
            self._local = os.fspath(directory)
        self._writer = SummaryWriter(self._local)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if k != "step":
                self._writer.add_scalar(k, v, step)
        self._writer.flush()
        if self._remote is not None and (
                time.monotonic() - self._uploaded_at >= self._upload_every_s):
            self.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._remote is not None:
            self._writer.flush()
            upload_dir(Path(self._local), self._remote)
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        self._writer.close()
        if self._remote is not None:
            upload_dir(Path(self._local), self._remote)
            shutil.rmtree(self._local, ignore_errors=True)


class WandbSink:
    """Weights & Biases, when installed (`pip install wandb`)."""

    def __init__(self, project: str, name: str, config: dict[str, Any], directory: str | None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"run.wandb_project={project!r} needs wandb: pip install wandb"
                              ) from e
        self._run = wandb.init(project=project, name=name, config=config, dir=directory)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsLog:
    """Every step's metrics, in order, fanned out to the sinks."""

    def __init__(self, output_dir: str | None = None, *, resume_step: int | None = None,
                 sinks: list[Sink] | None = None):
        """With `resume_step`, keeps the logged steps <= resume_step and drops the rest (they
        will be run again), so the JSONL log has every step exactly once."""
        self.history: list[dict[str, float]] = []
        # Rows of evaluations logged on their own (the baseline before step 1, at step 0).
        self.eval_rows: list[dict[str, float]] = []
        self.sinks: list[Sink] = list(sinks or [])
        self._dir = as_path(output_dir) if output_dir else None
        self._records: dict[str, JsonlSink] = {}  # RECORD_FILES, opened on first write
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            file = self._dir / "metrics.jsonl"
            if resume_step is not None:
                for m in _trim(file, resume_step):
                    (self.eval_rows if is_eval_row(m) else self.history).append(m)
                for name in RECORD_FILES:
                    _trim(self._dir / name, resume_step)
            self.sinks.insert(0, JsonlSink(file))

    def append(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        for sink in self.sinks:
            sink.write(int(metrics.get("step", len(self.history))), metrics)

    def write_records(self, name: str, records: list[dict[str, Any]]) -> None:
        """Appends JSON lines (each with its "step") to <output_dir>/<name>, one of
        RECORD_FILES (nothing without an output_dir); rollouts also go to TensorBoard as
        text."""
        assert name in RECORD_FILES, name
        if self._dir is not None and records:
            if name not in self._records:
                self._records[name] = JsonlSink(self._dir / name)
            for r in records:
                self._records[name].write(int(r["step"]), r)
        if name == "samples.jsonl":
            for sink in self.sinks:
                if isinstance(sink, TensorBoardSink):
                    for i, r in enumerate(records):
                        sink.write_text(f"samples/{i}", json.dumps(r, indent=1), int(r["step"]))

    def append_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation with no training step of its own (the baseline, step 0): a row of
        its own in the sinks, kept out of `history`."""
        row = {"step": step, **metrics}
        self.eval_rows.append(row)
        for sink in self.sinks:
            sink.write(step, row)

    def flush(self) -> None:
        """Makes every step logged so far durable in the sinks that batch their writes."""
        for sink in [*self.sinks, *self._records.values()]:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()

    def close(self) -> None:
        for sink in [*self.sinks, *self._records.values()]:
            sink.close()
        self.sinks, self._records = [], {}

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


# JSON-lines files beside metrics.jsonl, a line per record, each with the step it belongs to:
# rollouts (run.log_samples) and evaluation completions.
RECORD_FILES = ("samples.jsonl", "eval_samples.jsonl")


def _trim(file: epath.Path, resume_step: int) -> list[dict[str, Any]]:
    """Keeps the lines of `file` with step <= resume_step (they will not run again) and
    returns them; a line cut off by a kill is dropped."""
    if not file.exists():
        return []
    kept = []
    for line in file.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if m.get("step", 0) <= resume_step:
            kept.append(m)
    text = "".join(json.dumps(m) + "\n" for m in kept)
    if is_url(file):
        file.write_text(text)  # an object is replaced whole: old or new, never half
    else:
        tmp = file.with_suffix(".jsonl.tmp")
        tmp.write_text(text)
        tmp.replace(file)  # atomic: a kill here leaves the old or the new file
    return kept


def is_eval_row(row: dict[str, Any]) -> bool:
    """A logged row that holds an evaluation only (MetricsLog.append_eval)."""
    return all(k == "step" or k.startswith("eval/") for k in row)


def to_float(value: Any) -> float:
    f = float(value)
    return f if math.isfinite(f) else float("nan")
