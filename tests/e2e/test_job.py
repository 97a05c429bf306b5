"""End to end: the Job API and the CLI on 8 simulated devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config

pytestmark = pytest.mark.e2e  # each test runs whole jobs


def test_short_run_reward_rises(tmp_path):
    cfg = load_config(overrides=["run.steps=150", f"run.output_dir={tmp_path}"])
    with Job(cfg) as job:
        pretraced = []
        pretrace = job.trainer.pretrace
        job.trainer.pretrace = lambda batch: pretraced.append(pretrace(batch))
        first = job.step()
        assert job.meshes.trainer.size == job.meshes.sampler.size == 4
        # The loop had the first update traced ahead from a placeholder batch (while the
        # sampler compiled), and the real update reused that trace: one trace in all.
        assert len(pretraced) == 1 and pretraced[0] is not None
        assert job.trainer.update_traces == 1
        history = job.run()
    assert job.trainer.update_traces == 1  # one compiled update for the whole run
    assert len(history) == 150 and history[0] is first
    for key in ("reward/mean", "loss/policy", "kl/mean", "time/sample_s", "time/reward_s",
                "time/update_s", "time/reshard_s", "reshard/bytes"):
        assert all(np.isfinite(m[key]) for m in history), key
    rewards = np.array([m["reward/mean"] for m in history])
    assert rewards[-20:].mean() > rewards[:20].mean() + 0.08, rewards
    # The sampler scored with the weights the trainer had: same logprobs up to float rounding.
    assert max(m["sampler/logp_abs_diff"] for m in history) < 1e-4
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The baseline evaluation (step 0, before any update), then a row per step; the held-out
    # evaluations at 50, 100 and 150 are in their steps' rows.
    assert [r["step"] for r in rows] == [0, *range(1, 151)]
    assert set(rows[0]) - {"step"} and all(k.startswith("eval/") for k in rows[0] if k != "step")
    assert [int(r["step"]) for r in rows if "eval/accuracy" in r] == [0, 50, 100, 150]


def test_cli_run_smoke(tmp_path):
    env = {**os.environ, "COLUMNS": "120"}
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", "run.steps=3", "run.progress=false",
         f"run.output_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trainer: 4 devices [0, 1, 2, 3]" in out.stdout
    assert "done: 3 steps" in out.stdout
    assert "eval  step    0  accuracy" in out.stdout and "eval  step    3  accuracy" in out.stdout
    assert "eval: held-out accuracy" in out.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the baseline evaluation's row, then one per step


def test_cli_rejects_bad_config_before_jax():
    out = subprocess.run([sys.executable, "-m", "controller.cli", "run", "sampling.tempature=1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "did you mean sampling.temperature" in out.stderr


@pytest.mark.parametrize("command", [
    ["run", "sampling.tempature=1"], ["run", "sampling.temperature=-1"],
    ["plan", "--topology", "v5p-64", "sampling.group_size=1"],
    ["submit", "--cluster", "c", "--tpu-type", "v5p-8", "--docker-image", "i",
     "sampling.group_size=1"],
])
def test_a_config_error_is_printed_before_jax_is_imported(command):
    # The whole CLI in one process, as `tandem` runs it: after the error, neither JAX nor
    # orbax (seconds of import, and device start-up) may have been loaded.
    script = ("import sys\nfrom controller.cli import main\nrc = main(sys.argv[1:])\n"
              "heavy = sorted(m for m in ('jax', 'jaxlib', 'orbax', 'flax', 'optax')"
              " if m in sys.modules)\nprint('RC', rc, 'HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", script, *command], capture_output=True,
                         text=True, timeout=60)
    assert "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "RC 2 HEAVY []" in out.stdout, (out.stdout, out.stderr)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "controller.cli", "run", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "section.field=value" in out.stdout
