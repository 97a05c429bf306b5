"""A GRPO job on a text task with rewards in worker processes: failures reach the metrics."""

import json

import numpy as np
import pytest
from helpers import USER_REWARDS as USER

from controller.api import Job
from controller.config import load_config
from rewards.registry import RewardFailureError


def test_text_job_scores_in_workers_and_reports_failures(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a}+{a}=", "a": str(2 * a)}) + "\n"
                            for a in range(8)) + "{broken\n")
    cfg = load_config(overrides=[
        "data.task=jsonl", f"data.path={data}", "data.columns={prompt: q, target: a}",
        "data.prompts_per_step=2", "sampling.group_size=2", "sampling.max_new_tokens=4",
        # Cheap to compile (the test's cost): one layer; heads and MLP of one width, so the
        # parameter initialization compiles fewer shapes; no reference model (β = 0); no
        # shared-prompt prefill (a second decoder path, for G = 2 rows of a 5-token prompt).
        "model.hidden_size=16", "model.mlp_dim=16", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=2", "algorithm.beta=0", "sampling.share_prompt=false",
        f"rewards.functions=[gsm8k, '{USER}:always_raises']", "rewards.backend=process",
        "rewards.num_workers=1", "rewards.fallback_score=-1.0",
        "rewards.max_failure_fraction=1.0", "run.steps=2", "run.progress=false",
    ])
    with pytest.warns(UserWarning, match="line 9: not valid JSON"), Job(cfg) as job:
        m = job.step()
        assert m["rewards/failures_error"] == 4.0  # every always_raises call, counted
        assert m["rewards/failure_frac"] == 0.5
        assert np.isnan(m["reward/always_raises"])  # no successful call to average
        assert 0.0 <= m["reward/gsm8k"] <= 1.0
        # r = gsm8k + fallback: the broken reward costs -1 each, visibly.
        assert m["reward/mean"] == pytest.approx(m["reward/gsm8k"] - 1.0)
        job.loop.rewards.max_failure_fraction = 0.25
        with pytest.raises(RewardFailureError, match="RuntimeError: this reward is broken"):
            job.step()
