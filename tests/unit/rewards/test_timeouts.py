"""Hung reward calls are cut at their timeout, on every backend, and the batch's time is bounded.

Each worker runs one call at a time and takes the next as soon as it is free (the in-process
backend is one worker; the pool gets one call per chunk here), so n hung calls on w workers
hold them for ceil(n/w) timeouts back to back. Two clocks check it:
- each hung call's heartbeats show how long it ran before it was cut: at most the timeout plus a
  small slack, whatever else the machine is doing;
- the batch takes at least ceil(n/w) timeouts, and at most that plus, per round, the start-up
  of the replacement workers that the process and Ray backends wait for. That start-up is
  measured on the same backend just before (workers that crash are replaced with no timeout
  involved); it varies from one start to the next, so the bound allows twice it.
A backend that waits 5× its timeout fails the first clock, and the second too where workers
start quickly (the pool's in a fraction of a second; Ray's actors take a second or more).
"""

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import USER_REWARDS as USER

from rewards.pool import LocalBackend, ProcessPool
from rewards.registry import RewardSet, build_specs

TIMEOUT_S = 0.5
SLACK_S = 1.0  # noticing the deadline, killing the worker, pickling: well under a second
FUNCTIONS = [f"{USER}:hang_with_heartbeat", f"{USER}:with_ids", f"{USER}:dies"]


def _ray_backend(workers: int) -> Any:
    from rewards.ray_backend import RayBackend

    return RayBackend(build_specs(FUNCTIONS), num_workers=workers, timeout_s=TIMEOUT_S)


# name -> (backend from num_workers, whether it replaces a hung worker)
BACKENDS: dict[str, tuple[Callable[[int], Any], bool]] = {
    "local": (lambda w: LocalBackend(build_specs(FUNCTIONS), timeout_s=TIMEOUT_S), False),
    "process": (lambda w: ProcessPool(build_specs(FUNCTIONS), num_workers=w,
                                      timeout_s=TIMEOUT_S, chunk_size=1), True),
    "ray": (_ray_backend, True),
}


def _score(rs: RewardSet, completions: list[str], heartbeat_dir: Path
           ) -> tuple[list[float], dict[str, float]]:
    n = len(completions)  # completion i has i + 1 ids
    return rs.score(["p"] * n, completions, [{"heartbeat_dir": str(heartbeat_dir)}] * n,
                    [list(range(i + 1)) for i in range(n)])


@pytest.mark.parametrize("name, workers, hung", [
    ("local", 1, 2),  # SIGALRM interrupts the pure-Python loop; calls run one after another
    ("process", 1, 2),
    ("process", 2, 4),
    ("ray", 2, 2),
], ids=["local", "process-1", "process-2", "ray-2"])
def test_hung_calls_are_cut_at_their_timeout(name, workers, hung, request, tmp_path):
    if name == "ray":
        request.getfixturevalue("local_ray")
    make, replaces = BACKENDS[name]
    with RewardSet(FUNCTIONS, backend=make(workers), fallback_score=-1.0,
                   max_failure_fraction=1.0) as rs:
        assert _score(rs, ["ok"], tmp_path)[1]["rewards/failures"] == 0.0  # workers are up
        start_s = 0.0
        if replaces:  # every worker dies; the next batch waits for their replacements
            t0 = time.monotonic()
            # (A crash, or on a loaded machine a timeout: Ray may report a death late.)
            assert _score(rs, ["die"] * workers, tmp_path)[1]["rewards/failures"] == workers
            assert _score(rs, ["ok"], tmp_path)[1]["rewards/failures"] == 0.0
            start_s = time.monotonic() - t0
            replaced = rs.backend.workers_replaced

        # Completions alternate "hang" and "ok". The calls run reward by reward, so the with_ids
        # and dies calls come after every hung call, on the last round's replacements.
        completions = ["hang", "ok"] * hung
        t0 = time.monotonic()
        totals, m = _score(rs, completions, tmp_path)
        elapsed = time.monotonic() - t0
        if replaces:
            assert rs.backend.workers_replaced == replaced + hung

    ran_s = [b[-1] - b[0] for b in (list(map(float, p.read_text().split()))
                                     for p in tmp_path.iterdir())]
    assert len(ran_s) == hung and max(ran_s) < TIMEOUT_S + SLACK_S, ran_s
    rounds = math.ceil(hung / workers)
    bound = rounds * (TIMEOUT_S + 2 * start_s) + SLACK_S
    assert rounds * TIMEOUT_S <= elapsed < bound, (elapsed, rounds, start_s)
    assert TIMEOUT_S <= m["rewards/call_s_max"] < TIMEOUT_S + SLACK_S  # as the backend saw it

    assert m["rewards/failures_timeout"] == hung and m["rewards/failures"] == hung
    # r = hang_with_heartbeat + with_ids + dies: a hung call scores the fallback -1 (not 1);
    # with_ids is the number of ids, i + 1 for completion i, whatever happened to the others.
    want = [(-1.0 if c == "hang" else 1.0) + (i + 1) + 1.0 for i, c in enumerate(completions)]
    assert totals == pytest.approx(want)
    assert m["reward/hang_with_heartbeat"] == 1.0 and m["reward/dies"] == 1.0
    assert m["reward/with_ids"] == pytest.approx((len(completions) + 1) / 2)
