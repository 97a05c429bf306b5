"""The fast paths change how a step is computed, never what: the same seeded job
run the unoptimised way (every row prefills and forwards its own copy of the prompt; FSDP
trainer, tensor-parallel sampler) and the way bench/grpo_step.py runs it (one prompt pass per
group; data parallel on both sides) gives the same loss and reward curves."""

import jax
import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config

JOB = ["data.task=synthetic", "data.prompt_tokens=32", "data.prompts_per_step=4",
       "rewards.functions=[synthetic_even]", "model.vocab_size=64", "model.hidden_size=32",
       "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=48",
       "model.qkv_bias=true", "sampling.group_size=4", "sampling.max_new_tokens=6",
       "algorithm.beta=0.04", "optimizer.learning_rate=3e-3", "run.steps=5",
       "run.progress=false", "status.enabled=false"]
UNOPTIMISED = ["sampling.share_prompt=false"]  # default layouts: FSDP trainer, TP sampler
OPTIMISED = ["sampling.share_prompt=true", "topology.trainer_rules={batch: fsdp}",
             "topology.sampler_mesh={dp: -1, tp: 1}"]


def _curves(extra):
    with Job(load_config(overrides=[*JOB, *extra])) as job:
        history = job.run()
        return history, jax.device_get(job.trainer.params)


@pytest.fixture(scope="module")
def unoptimised():
    return _curves(UNOPTIMISED)


@pytest.mark.parametrize("extra", [OPTIMISED, [*OPTIMISED, "schedule.kind=colocated"]],
                         ids=["disaggregated", "colocated"])
def test_optimised_run_has_the_unoptimised_curves(unoptimised, extra):
    base, p_base = unoptimised
    fast, p_fast = _curves(extra)
    assert len(fast) == len(base) == 5
    for step, (a, b) in enumerate(zip(base, fast, strict=True)):
        # The same completions are drawn (the float differences never flip a sample), so the
        # rewards are identical; losses and KL agree to float rounding.
        assert b["reward/mean"] == a["reward/mean"], step
        for key in ("loss/total", "loss/policy", "kl/mean", "grad/norm", "policy/entropy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{key} at step {step}")
    assert base[-1]["reward/mean"] != base[0]["reward/mean"]  # the policy did move
    # Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr per step on
    # rounding alone, so params are compared at 1% of the 5 steps' reach (5 · lr = 1.5e-2).
    for x, y in zip(jax.tree.leaves(p_base), jax.tree.leaves(p_fast), strict=True):
        np.testing.assert_allclose(y, x, atol=1.5e-4)


def test_trainer_compiles_once_per_prompt_bucket_not_per_width():
    # reverse_digits prompts vary in width from batch to batch; the loop pads them to the
    # sampler's bucket, so neither side recompiles when the width changes.
    cfg = load_config(overrides=["data.prompts_per_step=2", "sampling.group_size=2",
                                 "data.min_digits=1", "data.max_digits=5", "run.steps=6",
                                 "run.progress=false", "status.enabled=false"])
    with Job(cfg) as job:
        widths = set()
        for _ in range(cfg.run.steps):
            before = job.dataset.position
            job.step()
            rows = [job.dataset.row(i) for i in range(before, job.dataset.position)]
            widths.add(max(len(job.tokenizer.encode(r["prompt"])) for r in rows))
        assert len(widths) > 1  # the test means something only if widths changed
        assert job.trainer.update_traces == 1  # the update traced (and compiled) once
        assert job.sampler.metrics()["sampler/compiles"] == 1
