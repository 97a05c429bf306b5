"""Checkpoints: exact resume after kill -9, SIGTERM, corrupt checkpoints, other device counts."""

import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.runs import SMALL, cli_run, steps_logged, wait_for_steps

from controller.api import Job
from controller.config import ConfigError, load_config

pytestmark = pytest.mark.e2e  # each test runs whole jobs


def _cfg(out: Path, *extra: str):
    return load_config(overrides=[*SMALL, f"run.output_dir={out}", *extra])


def _params(job: Job):
    return jax.device_get(job.trainer.params)


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    n = 10
    with Job(_cfg(tmp_path / "ref", f"run.steps={n}", "checkpoint.every_steps=2")) as ref:
        ref.run()
        want = _params(ref)

    out = tmp_path / "killed"
    proc = cli_run(out, "run.steps=1000", "checkpoint.every_steps=2")
    wait_for_steps(proc, out, 5)
    proc.send_signal(signal.SIGKILL)  # from outside, mid-run: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(steps_logged(out))
    assert 5 <= killed_at < 1000

    with Job(_cfg(out, f"run.steps={n}", "checkpoint.every_steps=2", "run.resume=true")) as job:
        assert job.resumed_from is not None and job.resumed_from <= killed_at
        assert job.resumed_from % 2 == 0
        job.run()
        got = _params(job)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise, not approximately
    assert steps_logged(out) == list(range(1, n + 1))  # every step exactly once


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    proc = cli_run(tmp_path, "run.steps=100000", "checkpoint.every_steps=0")
    wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert "stopped at step" in text
    steps = steps_logged(tmp_path)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [steps[-1]]  # the step it stopped after, and nothing half-done


def test_corrupt_latest_checkpoint_falls_back_and_other_device_count(tmp_path, caplog):
    with Job(_cfg(tmp_path, "run.steps=4", "checkpoint.every_steps=2",
                  "checkpoint.async_save=false")) as job:
        job.run()
        at_2 = None
    # Corrupt step 4: its array files are gone but the directory looks complete.
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower():
            f.write_bytes(b"garbage")
    # Resume onto a 2-device trainer (the checkpoint was written from 4).
    cfg = _cfg(tmp_path, "run.steps=5", "run.resume=true", "topology.trainer_devices=2")
    with caplog.at_level("WARNING"), Job(cfg) as job:
        assert job.resumed_from == 2
        assert job.meshes.trainer.size == 2
        leaf = job.trainer.params["layers"][0]["mlp"]["gate_proj"]
        assert len(leaf.sharding.device_set) == 2
        at_2 = _params(job)
        assert job.dataset.position == 2 * 4  # two steps of 4 prompts were consumed
        job.run()
    assert "unreadable" in caplog.text
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]  # the lost 3, 4 were re-run, logged once
    # Step 2's checkpoint restores to the same values on any device count.
    with Job(_cfg(tmp_path / "again", "run.steps=2", "checkpoint.async_save=false")) as fresh:
        fresh.run()
        for a, b in zip(jax.tree.leaves(_params(fresh)), jax.tree.leaves(at_2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_existing_run_is_never_overwritten(tmp_path):
    with Job(_cfg(tmp_path, "run.steps=1")) as job:
        job.run()
    with pytest.raises(ConfigError, match="run.resume=true to continue"):
        Job(_cfg(tmp_path, "run.steps=2"))
