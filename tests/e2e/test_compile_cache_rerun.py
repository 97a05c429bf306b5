"""A job started again with the same config loads its programs from the compile cache and
computes exactly what the first run did."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controller.metrics import is_eval_row
from controller.startup import JAX_CACHE_ENV
from controller.topology import simulation_env

pytestmark = pytest.mark.e2e  # each test runs whole jobs

ARGS = ["data.prompts_per_step=4", "sampling.group_size=4", "run.steps=3", "run.progress=false"]


def _run(out: Path, cache: Path) -> tuple[str, list[dict]]:
    env = {**os.environ, **simulation_env(8)}
    # This test is about run.compile_cache_dir: no cache directory handed to JAX from outside.
    for k in JAX_CACHE_ENV:
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", *ARGS, f"run.output_dir={out}",
         f"run.compile_cache_dir={cache}"],
        env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = re.sub(r"\s+", " ", proc.stdout)  # the console wraps long lines
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return text, [r for r in rows if not is_eval_row(r)]  # the training steps


def test_second_run_reuses_compiled_programs_and_matches_the_first(tmp_path):
    cache = tmp_path / "xla-cache"
    first_out, first = _run(tmp_path / "a", cache)
    assert f"compile cache: {cache}" in first_out
    assert "from the compile cache" not in first_out  # nothing to reuse yet
    written = sorted(p.name for p in cache.iterdir())
    assert any("generate" in n for n in written) and any("update_step" in n for n in written)

    second_out, second = _run(tmp_path / "b", cache)
    hits = re.search(r"(\d+) programs from the compile cache", second_out)
    assert hits and int(hits.group(1)) >= 2, second_out  # at least the sampler and the update
    # Loaded programs compute what freshly compiled ones did: the same run, value for value.
    keys = ("reward/mean", "loss/total", "kl/mean", "grad/norm")
    assert [[r[k] for k in keys] for r in second] == [[r[k] for k in keys] for r in first]
