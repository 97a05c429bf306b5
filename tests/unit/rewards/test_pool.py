"""Reward backends: user functions by file path, timeouts, failures counted, workers replaced."""

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import USER_REWARDS as USER

from controller.config import RewardsConfig
from rewards.base import Call, RewardError
from rewards.pool import LocalBackend, ProcessPool
from rewards.registry import RewardFailureError, RewardSet, build_specs

TIMEOUT_S = 1.0
FUNCTIONS = [f"{USER}:{name}" for name in
             ("sleep_forever", "raises", "nan", "dies", "exact", "with_ids", "parts")]
# (gsm8k in workers is covered by test_ray.py; here it would add a sympy import to
# every worker start.)


@pytest.fixture(scope="module")
def pool_set():
    """One process pool for the module; fallback -1 so a failed call can't pass for a 0."""
    cfg = RewardsConfig(functions=FUNCTIONS, backend="process", num_workers=2,
                        timeout_s=TIMEOUT_S, fallback_score=-1.0, max_failure_fraction=1.0,
                        kwargs={"parts": {"scale": 2.0}},
                        component_weights={"parts/len": 0.5})
    rs = RewardSet.from_config(cfg)
    yield rs
    rs.close()


def _score(rs, completions, rows=None):
    rows = rows or [{"target": "ok", "answer": "#### 5"}] * len(completions)
    ids = [list(range(len(c))) for c in completions]
    return rs.score(["p"] * len(completions), completions, rows, ids)


def test_user_reward_by_file_path_with_kwargs_ids_and_components(pool_set):
    rows = [{"target": "ok"}, {"target": "5"}]
    totals, m = _score(pool_set, ["ok", "5"], rows)
    # Per completion: sleep_forever 1 + raises 1 + nan 0.5 + dies 1 + exact + with_ids len
    #   + parts (0.5 · 2·len + 1.0).
    # "ok": 1+1+0.5+1 + 1 + 2 + (0.5·4 + 1) = 9.5
    # "5":  1+1+0.5+1 + 1 + 1 + (0.5·2 + 1) = 7.5
    assert totals == pytest.approx([9.5, 7.5])
    assert m["reward/with_ids"] == 1.5 and m["reward/exact"] == 1.0
    assert m["reward/parts/len"] == pytest.approx(3.0)  # mean of 4 and 2: components unweighted
    assert m["reward/parts"] == pytest.approx((3.0 + 2.0) / 2)
    assert m["rewards/failures"] == 0.0
    # The same functions in this process give the same numbers.
    local = RewardSet(FUNCTIONS, kwargs={"parts": {"scale": 2.0}},
                      component_weights={"parts/len": 0.5})
    assert _score(local, ["ok", "5"], rows)[0] == totals


def test_a_reward_that_sleeps_forever_is_cut_at_its_timeout(pool_set):
    t0 = time.monotonic()
    totals, m = _score(pool_set, ["ok", "hang", "ok", "hang"])
    elapsed = time.monotonic() - t0
    # The 28 calls go out 4 per chunk, and both hung calls (sleep_forever on completions 1 and
    # 3) are in the first: they run one after the other, two timeouts, while the other worker
    # scores the rest. No replacement worker is waited for. (test_timeouts.py: every backend.)
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + 2, elapsed
    assert m["rewards/failures_timeout"] == 2.0 and m["rewards/failures"] == 2.0
    # "ok": 1+1+0.5+1 + 1 + 2 + (0.5·4 + 1) = 9.5; "hang": sleep_forever scores the
    # fallback -1 (not 1): -1+1+0.5+1 + 0 + 4 + (0.5·8 + 1) = 10.5.
    assert totals == pytest.approx([9.5, 10.5, 9.5, 10.5])
    # The hung workers were replaced and the pool still scores.
    assert _score(pool_set, ["ok"])[1]["rewards/failures"] == 0.0


def test_raising_nan_and_crashing_rewards_are_counted_never_a_silent_zero(pool_set):
    backend = pool_set.backend
    replaced = backend.workers_replaced
    totals, m = _score(pool_set, ["ok", "bad", "die"])
    assert m["rewards/failures_error"] == 1.0  # raises on "bad"
    assert m["rewards/failures_nonfinite"] == 1.0  # nan on "bad"
    assert m["rewards/failures_crash"] == 1.0  # dies on "die": its worker was SIGKILLed
    assert m["rewards/failure_frac"] == pytest.approx(3 / (3 * len(FUNCTIONS)))
    assert backend.workers_replaced == replaced + 1
    # "bad": raises and nan score the fallback -1 (not 1 and 0.5):
    #   1-1-1+1 + 0 + 3 + (0.5·6 + 1) = 7.0
    # "die": dies scores -1: 1+1+0.5-1 + 0 + 3 + 4 = 8.5
    assert totals == pytest.approx([9.5, 7.0, 8.5])
    outcomes = backend.run([Call(1, "p", "bad", None, {})])
    assert outcomes[0].kind == "error" and "ValueError: cannot score 'bad'" in outcomes[0].detail


def test_too_many_failures_stop_the_step_with_a_traceback(pool_set):
    strict = RewardSet(FUNCTIONS, backend=pool_set.backend, max_failure_fraction=0.05)
    with pytest.raises(RewardFailureError) as e:
        _score(strict, ["bad", "ok"])
    msg = str(e.value)
    assert "2/14 reward calls failed (error=1, nonfinite=1)" in msg
    assert "Traceback" in msg and "ValueError: cannot score 'bad'" in msg
    assert "rewards.max_failure_fraction=0.05" in msg


def test_local_backend_times_out_pure_python_and_counts_failures():
    specs = build_specs([f"{USER}:sleep_forever", f"{USER}:not_a_number"])
    backend = LocalBackend(specs, timeout_s=0.5)
    out = backend.run([Call(0, "p", "hang", None, {}), Call(0, "p", "ok", None, {}),
                       Call(1, "p", "ok", None, {})])
    assert [o.kind for o in out] == ["timeout", "ok", "error"]
    assert "'high'" in out[2].detail


def test_pool_rejects_a_broken_spec_up_front():
    with pytest.raises(RewardError, match="has no function 'nope'"):
        ProcessPool(build_specs([f"{USER}:nope"]), num_workers=1)


def _sandboxes_with_marker(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "_sandbox_boot.py" in cmd and marker in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_killed_worker_takes_its_sandboxed_program_with_it():
    marker = str(517 << 20)
    with RewardSet([f"{USER}:sandbox_sleeps"], backend=ProcessPool(
            build_specs([f"{USER}:sandbox_sleeps"]), num_workers=1, timeout_s=1.0),
            max_failure_fraction=1.0) as rs:
        _, m = rs.score(["p"], ["c"], [{}])
    assert m["rewards/failures_timeout"] == 1.0
    deadline = time.monotonic() + 5
    while _sandboxes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandboxes_with_marker(marker) == []


def test_a_worker_that_died_between_batches_is_replaced_without_blame(pool_set):
    backend = pool_set.backend
    victim = backend.processes[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=5)
    totals, m = _score(pool_set, ["ok"] * 4)
    assert m["rewards/failures"] == 0.0 and totals == pytest.approx([9.5] * 4)
    assert backend.processes[0].pid != victim.pid
