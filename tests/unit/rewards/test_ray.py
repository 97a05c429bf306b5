"""The Ray backend scores like the process pool (skipped where Ray is not installed)."""

import json

import pytest

pytest.importorskip("ray")

from helpers import USER_REWARDS as USER

from controller.data.datasets import gsm8k_path
from rewards.pool import ProcessPool
from rewards.ray_backend import RayBackend
from rewards.registry import RewardSet, build_specs

FUNCTIONS = ["gsm8k", "format", f"{USER}:parts", f"{USER}:sleep_forever", f"{USER}:dies"]
TIMEOUT_S = 2.0


def _batch():
    with open(gsm8k_path("test")) as f:
        rows = [json.loads(line) for _, line in zip(range(6), f, strict=False)]
    for r in rows:
        r["target"] = r["answer"].rsplit("####", 1)[1].strip()
    completions = []
    for i, r in enumerate(rows):
        completions += [r["answer"], f"<think>t</think><answer>{r['target']}</answer>",
                        f"<answer>{int(r['target'].replace(',', '')) + i + 1}</answer>"]
    rows = [r for r in rows for _ in range(3)]
    return ["p"] * len(rows), completions, rows


def test_ray_backend_scores_like_the_process_pool(local_ray):
    specs = build_specs(FUNCTIONS)
    prompts, completions, rows = _batch()
    completions[4] = "hang"  # sleep_forever hangs on it
    completions[7] = "die"  # dies kills its worker / actor
    kw = {"fallback_score": -1.0, "max_failure_fraction": 1.0}
    with RewardSet(FUNCTIONS, backend=ProcessPool(specs, num_workers=1, timeout_s=TIMEOUT_S),
                   **kw) as pool_set:
        want, want_m = pool_set.score(prompts, completions, rows)
    ray_backend = RayBackend(specs, num_workers=2, timeout_s=TIMEOUT_S)
    with RewardSet(FUNCTIONS, backend=ray_backend, **kw) as ray_set:
        got, got_m = ray_set.score(prompts, completions, rows)
        assert ray_backend.workers_replaced == 2  # the hung actor and the dead one
        again, _ = ray_set.score(prompts[:3], completions[:3], rows[:3])  # still serving
    assert got == want
    assert got_m == pytest.approx({**want_m, "rewards/call_s_max": got_m["rewards/call_s_max"]},
                                  nan_ok=True)
    assert got_m["rewards/failures_timeout"] == 1.0 and got_m["rewards/failures_crash"] == 1.0
    # Reference solutions and tagged right answers score 1 on gsm8k, wrong numbers 0.
    # ("hang" and "die" replaced two correct completions: 10 of 18 right).
    assert got_m["reward/gsm8k"] == pytest.approx((6 * 2 - 2) / (6 * 3))
    assert again == want[:3]
