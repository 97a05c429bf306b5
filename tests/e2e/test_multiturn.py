"""Multi-turn jobs end to end: the built-in `reverse_digits_check` task under each schedule and
several algorithms (only the model's tokens carry loss; the sampler's and the trainer's
logprobs agree on them), its metrics in every sink, and the task learned from scratch."""

import json

import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config

pytestmark = pytest.mark.e2e  # each test runs whole jobs

SMALL = ["env.name=reverse_digits_check", "data.prompts_per_step=4", "sampling.group_size=4",
         "run.progress=false", "status.enabled=false"]


@pytest.mark.parametrize("extra", [
    ["schedule.kind=sync"],
    ["schedule.kind=async", "schedule.max_staleness=1"],
    ["schedule.kind=colocated", "env.history=reprefill"],
    # μ = 2 recomputes π_old (its logprob gap is measured before the update), GSPO's
    # sequence ratio, DAPO's filters and clip-higher, π_old from the sampler.
    ["algorithm.num_iterations=2", "algorithm.importance_sampling_level=sequence"],
    ["algorithm.dynamic_sampling=true", "algorithm.overlong_filtering=true",
     "algorithm.epsilon_high=0.28", "algorithm.loss_aggregation=seq-mean-token-sum-norm"],
    ["algorithm.old_logprobs=sampler", "algorithm.advantage_estimator=rloo",
     "algorithm.kl_penalty=reward"],
])
def test_multiturn_jobs_train_on_model_tokens_only(extra, tmp_path):
    cfg = load_config(overrides=[*SMALL, "run.steps=3", f"run.output_dir={tmp_path}",
                                 "run.log_samples=2", "run.tensorboard=true", *extra])
    with Job(cfg) as job:
        history = job.run()
        # The status service's board has each step's env metrics too.
        assert "env/turns_mean" in job.board.latest().values
    for m in history:
        assert m["env/turns_mean"] >= 1 and m["env/model_tokens"] > 0
        # Only the model's tokens count in the loss (overlong filtering drops truncated rows).
        if "algorithm.overlong_filtering=true" not in extra:
            assert m["loss/tokens"] == m["env/model_tokens"]
        else:  # truncated rows drop out; observation tokens never count
            assert 0 < m["loss/tokens"] <= m["env/model_tokens"]
        assert m["completion/tokens"] == m["env/model_tokens"] + m["env/masked_tokens"]
        assert np.isfinite(m["loss/total"])
        if m["policy/staleness"] == 0:  # a stale batch (async) was drawn by older weights
            assert m["sampler/logp_abs_diff"] < 1e-4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("env/tool_errors/bad_arguments" in x and "time/env_s" in x for x in lines)
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {"turns", "tool_calls", "tool_errors", "ended", "conversation"} <= set(samples[0])
    # The transcript is the whole completion, observations included (plain rendering).
    assert all(x["completion"] == "".join(m["content"] for m in x["conversation"][1:])
               for x in samples)
    assert list((tmp_path / "tensorboard").iterdir())


def test_the_builtin_multiturn_task_is_learned():
    """`tandem run env.name=reverse_digits_check` for 80 steps: the model learns to check its
    answers (more turns per row) and the reward rises (README: 400 steps)."""
    cfg = load_config(overrides=["env.name=reverse_digits_check", "run.steps=80",
                                 "run.progress=false", "status.enabled=false"])
    with Job(cfg) as job:
        history = job.run()
    reward = [m["reward/mean"] for m in history]
    turns = [m["env/turns_mean"] for m in history]
    assert np.mean(reward[-10:]) > np.mean(reward[:10]) + 0.05, (reward[:10], reward[-10:])
    assert np.mean(turns[-10:]) > np.mean(turns[:10]) + 1.0, (turns[:10], turns[-10:])
