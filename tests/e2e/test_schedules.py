"""Schedules: async equals sync at k=0, staleness bounds, colocated, timeline, clean shutdown."""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config
from trainer.loss import truncated_is_weights

pytestmark = pytest.mark.e2e  # each test runs whole jobs

SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.progress=false"]


def _run(steps: int, *extra: str) -> tuple[list[dict], dict]:
    with Job(load_config(overrides=[*SMALL, f"run.steps={steps}", *extra])) as job:
        history = job.run()
        return history, jax.device_get(job.trainer.params)


def test_truncated_is_weight_is_one_on_policy_and_capped_off_policy():
    logps = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
    np.testing.assert_array_equal(truncated_is_weights(logps, logps, 2.0), [[1.0, 1.0, 1.0]])
    # π/μ = 0.5/0.1 = 5 -> capped at 2; 0.2/0.4 = 0.5; 0.9/0.9 = 1.
    behaviour = jnp.log(jnp.array([[0.1, 0.4, 0.9]]))
    np.testing.assert_allclose(truncated_is_weights(logps, behaviour, 2.0), [[2.0, 0.5, 1.0]],
                               rtol=1e-6)


def test_async_with_zero_staleness_equals_sync():
    sync, p_sync = _run(4, "schedule.kind=sync")
    asyn, p_async = _run(4, "schedule.kind=async", "schedule.max_staleness=0")
    for a, b in zip(sync, asyn, strict=True):
        for key in ("reward/mean", "loss/total", "grad/norm", "kl/mean"):
            assert a[key] == b[key], key
        assert b["policy/staleness"] == 0 and b["policy/is_weight_mean"] == 1.0
    for a, b in zip(jax.tree.leaves(p_sync), jax.tree.leaves(p_async), strict=True):
        np.testing.assert_array_equal(a, b)


def test_async_staleness_is_bounded_and_reported(tmp_path):
    cfg = load_config(overrides=[*SMALL, "run.steps=6", "schedule.kind=async",
                                 "schedule.max_staleness=1", f"run.output_dir={tmp_path}"])
    with Job(cfg) as job:
        history = job.run()
        assert job.loop.schedule == "async"
    assert [m["policy/staleness"] for m in history if m["policy/staleness"] > 1] == []
    assert all(m["async/dropped_batches"] == 0 for m in history)
    assert [m["policy/version"] for m in history] == [1, 2, 3, 4, 5, 6]
    alive = [t.name for t in threading.enumerate() if t.name.startswith("tandem-")]
    assert alive == []  # Job.close() stopped the sampler thread

    trace = json.loads((tmp_path / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {"sample", "score", "update", "reshard"} <= {e["name"] for e in spans}
    for e in spans:
        assert {"name", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"sampler", "host", "trainer"}


def test_async_trains_on_batches_sampled_by_older_weights(monkeypatch):
    # A slow update gives the producer time to sample the next batch before the trainer
    # pushes new weights, so with k = 1 every batch after the first is exactly one version
    # stale, and its truncated IS weights differ from 1.
    cfg = load_config(overrides=[*SMALL, "run.steps=5", "schedule.kind=async",
                                 "schedule.max_staleness=1"])
    with Job(cfg) as job:
        update = job.trainer.update

        def slow_update(*args, **kwargs):
            time.sleep(0.5)
            return update(*args, **kwargs)

        monkeypatch.setattr(job.trainer, "update", slow_update)
        history = job.run()
    assert [m["policy/staleness"] for m in history] == [0, 1, 1, 1, 1]
    assert history[0]["policy/is_weight_mean"] == 1.0  # on-policy: w = 1 exactly
    assert all(m["policy/is_weight_mean"] != 1.0 for m in history[1:])


def test_async_weight_push_that_never_arrives_is_an_error_not_a_hang():
    cfg = load_config(overrides=[*SMALL, "run.steps=6", "schedule.kind=async",
                                 "schedule.max_staleness=1"])
    with Job(cfg) as job:
        stats = job.loop.push_weights()
        # Pushes that report success but never load the weights: the producer ends up
        # waiting for a version that only the (waiting) trainer could deliver.
        job.loop.push_weights = lambda step=0: stats
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="the async loop is stuck"):
            job.run()
        assert time.monotonic() - t0 < 60


def test_timeline_summary_fractions_are_consistent():
    from controller.timeline import Timeline

    tl = Timeline()
    # sampler busy [0, 4), trainer busy [2, 6) and [8, 10): wall 10, overlap [2, 4) = 2.
    tl.add("sample", "sampler", 1, 0.0, 4.0)
    tl.add("update", "trainer", 1, 2.0, 6.0)
    tl.add("wait", "trainer", 2, 6.0, 8.0)  # waiting is idle
    tl.add("update", "trainer", 2, 8.0, 10.0)
    s = tl.summary()
    assert s["timeline/wall_s"] == pytest.approx(10.0)
    assert s["timeline/sampler_busy_frac"] == pytest.approx(0.4)
    assert s["timeline/trainer_busy_frac"] == pytest.approx(0.6)
    assert s["timeline/trainer_idle_frac"] == pytest.approx(0.4)
    assert s["timeline/overlap_frac"] == pytest.approx(0.2)


def test_colocated_learns_like_disaggregated():
    colo, _ = _run(60, "schedule.kind=colocated", "data.prompts_per_step=8")
    disagg, _ = _run(60, "schedule.kind=sync", "data.prompts_per_step=8")
    assert colo[0]["reshard/bytes"] == 0  # same layout, same devices: nothing copied
    r_colo = np.mean([m["reward/mean"] for m in colo[-15:]])
    r_dis = np.mean([m["reward/mean"] for m in disagg[-15:]])
    assert abs(r_colo - r_dis) < 0.05, (r_colo, r_dis)
    assert r_colo > np.mean([m["reward/mean"] for m in colo[:15]])
