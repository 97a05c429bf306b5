"""Each GRPO-family variant's example config runs a few steps of the built-in task.

The jobs are shrunk (1 layer, 2 prompts × G=4, 3 steps) so each compiles in seconds; the checks
are what distinguishes the variant, beyond "every metric is finite".
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config
from controller.data.tasks import digits_tokenizer
from rewards.registry import register_reward

EXAMPLES = Path(__file__).parents[2] / "examples"
SMALL = ["run.steps=3", "run.progress=false", "data.prompts_per_step=2", "sampling.group_size=4",
         "model.num_layers=1", "model.hidden_size=32", "model.mlp_dim=64", "data.max_digits=3"]


@register_reward("test_half_uniform")
def half_uniform(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """Even-index prompts: always 0.5 (a uniform group); odd: depends on the completion."""
    if row["index"] % 2 == 0:
        return 0.5
    return (sum(map(ord, completion)) % 97) / 97.0


def run(name: str, *extra: str) -> tuple[Job, list[dict[str, float]]]:
    cfg = load_config(EXAMPLES / f"{name}.yaml", [*SMALL, *extra])
    with Job(cfg) as job:
        history = job.run()
    for m in history:
        bad = {k: v for k, v in m.items() if not np.isfinite(v)}
        assert not bad, f"{name}: non-finite metrics {bad}"
        assert m["sampler/logp_abs_diff"] < 1e-4
    return job, history


def test_grpo_mu2_minibatches_kl_in_loss():
    _, h = run("grpo")
    assert all(m["optim/steps"] == 4 for m in h)  # μ=2 × 2 minibatches
    assert all(m["kl/mean"] >= 0 for m in h) and h[-1]["kl/mean"] > 0  # k3 >= 0
    # Later optimizer steps are off-policy, so the ratio moves away from 1.
    assert max(m["ratio/max"] for m in h) > 1.0
    assert h[0]["optim/lr"] < h[-1]["optim/lr"]  # warmup is still rising over 3 batches


def test_dr_grpo_no_std_no_reference():
    job, h = run("dr_grpo")
    assert job.trainer.ref_params is None and "kl/mean" not in h[0]  # β = 0
    # A = r - mean_g with r in [0, 1]: |A| <= 1, so its std is at most 0.5 (GRPO's is ~1).
    assert all(m["advantages/std"] <= 0.5 for m in h)
    assert all(abs(m["advantages/mean"]) < 1e-6 for m in h)


@pytest.fixture(scope="module")
def dapo_one_token_completions() -> tuple[Job, list[dict[str, float]]]:
    """DAPO with every token id a stop token: each completion is its first token, which stops
    it, so none is truncated (and the odd prompts' one-character completions still differ)."""
    vocab = digits_tokenizer().vocab_size
    return run("dapo", "rewards.functions=[test_half_uniform]",
               f"sampling.stop_tokens={list(range(vocab))}")


def test_dapo_dynamic_sampling_drops_uniform_groups(dapo_one_token_completions):
    # Every even-index prompt's group is uniform; each round of 2 prompts has one, so a batch
    # of 2 informative groups needs at least 2 rounds.
    job, h = dapo_one_token_completions
    for m in h:
        assert m["dynamic_sampling/rounds"] >= 2
        assert m["dynamic_sampling/groups_filtered"] >= m["dynamic_sampling/rounds"]
        if m["dynamic_sampling/shortfall_groups"] == 0:
            assert m["advantages/zero_frac"] == 0.0  # no uniform group reached the update
        assert m["completion/len_mean"] == 1.0
        # |y| = 1 <= L_max - L_cache = 8 - 2: no soft overlong punishment.
        assert m["reward/overlong_penalty_mean"] == 0.0
    # The data position moved by every round's prompts, not only the kept ones.
    assert job.dataset.position == sum(2 * m["dynamic_sampling/rounds"] for m in h)


def test_dapo_overlong_filtering_drops_only_truncated_rows(dapo_one_token_completions):
    _, h = dapo_one_token_completions
    for m in h:
        assert m["completion/stopped_frac"] == 1.0  # every completion ended on a stop token
        assert m["overlong/filtered_frac"] == 0.0  # so no trained row is truncated


def test_dapo_retries_run_out_and_the_batch_is_topped_up():
    # Greedy decoding makes every group's G completions identical: all groups are uniform.
    _, h = run("dapo", "sampling.temperature=0", "algorithm.dynamic_sampling_max_retries=1")
    for m in h:
        assert m["dynamic_sampling/rounds"] == 2
        assert m["dynamic_sampling/groups_filtered"] == 4
        assert m["dynamic_sampling/shortfall_groups"] == 2
        assert m["advantages/zero_frac"] == 1.0


def test_gspo_sequence_ratio_clips_with_a_tiny_epsilon():
    # A reward that varies with the completion on odd prompts, so groups have advantages to
    # step on (the example's task can give a random model all-equal groups for 3 steps).
    _, h = run("gspo", "rewards.functions=[test_half_uniform]")
    # ε = 3e-4/4e-4: after the first minibatch's step, most sequence ratios leave the range.
    assert max(m["loss/clip_frac"] for m in h) > 0
    assert all(m["ratio/min"] <= m["ratio/mean"] <= m["ratio/max"] for m in h)


def test_rloo_kl_in_reward():
    _, h = run("rloo")
    assert all(abs(m["advantages/mean"]) < 1e-6 for m in h)  # leave-one-out sums to 0
    assert h[0]["kl/reward_penalty_mean"] == pytest.approx(0.0, abs=1e-7)  # π_θ = π_ref
    assert h[-1]["kl/reward_penalty_mean"] > 0  # k3 > 0 once the policy moved
    assert "loss/kl" not in h[0]  # the KL is in the reward, not the loss


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "rloo"])
def test_every_variant_trains_lora_adapters(name):
    # Each algorithm with LoRA: the base never changes, the adapters move, and each step syncs
    # the adapters' bytes alone. GRPO's example (μ = 2) also runs with dropout: its π_old
    # logprobs are a forward without dropout, so the sampler comparison stays at rounding.
    import jax

    from trainer import lora

    extra = ["model.lora={rank: 4, dropout: 0.1}" if name == "grpo" else "model.lora={rank: 4}"]
    if name == "dapo":
        extra.append("rewards.functions=[test_half_uniform]")
    cfg = load_config(EXAMPLES / f"{name}.yaml", [*SMALL, *extra])
    with Job(cfg) as job:
        base0 = jax.device_get(job.trainer.base)
        adapters0 = jax.device_get(job.trainer.params)
        history = job.run()
        base1 = jax.device_get(job.trainer.base)
        adapters1 = jax.device_get(job.trainer.params)
    assert len(history) == 3
    for m in history:
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["sampler/logp_abs_diff"] < 1e-4
        assert m["reshard/bytes"] == lora.adapter_bytes(adapters1)
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(base0), jax.tree.leaves(base1), strict=True))
    assert max(np.abs(a - b).max() for a, b in zip(
        jax.tree.leaves(adapters0), jax.tree.leaves(adapters1), strict=True)) > 0
