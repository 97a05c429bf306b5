"""Helpers for tests that run jobs through the CLI and watch their metrics."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from controller.metrics import is_eval_row
from controller.topology import simulation_env

SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.progress=false"]


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [int(r["step"]) for r in rows if not is_eval_row(r)]  # training steps


def cli_run(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **simulation_env(8)}
    args = [sys.executable, "-m", "controller.cli", "run", *SMALL, f"run.output_dir={out}",
            *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).parents[2])


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while len(steps_logged(out)) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.02)
