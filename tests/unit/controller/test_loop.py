"""The trainer side of a step (`Loop.consume`, `Loop._train_batch`) with a stub trainer: the KL
penalty in the reward and DAPO's overlong filtering, on hand-worked batches; and the helpers
`produce` builds its batch and metrics with (`concat_samples`, `merge_reward_metrics`)."""

import dataclasses
import math

import numpy as np
import pytest

from controller.advantages import compute_advantages
from controller.config import load_config
from controller.loop import Rollout, Samples, SyncLoop, concat_samples, merge_reward_metrics
from reshard.transfer import TransferStats

G = 3  # completions per prompt
T = 4  # completion tokens


class StubTrainer:
    """What `Loop.consume` uses of a `Trainer`: a known per-row KL, and an update that records
    the batch it was handed."""

    lora = False  # full fine-tuning: the whole params move to the sampler

    def __init__(self, kl_B=None):
        self.kl_B = kl_B
        self.params = {"w": np.zeros(2, np.float32)}
        self.kl_calls: list = []
        self.updates: list = []

    def sequence_kl(self, batch):
        self.kl_calls.append(batch)
        return np.asarray(self.kl_B, np.float32)

    def update(self, batch, *, off_policy=False):
        self.updates.append((batch, off_policy))
        return {"loss/total": np.float32(0.0)}

    def pretrace(self, batch):
        return None


class StubSampler:
    shardings = None

    def load_weights(self, params):
        pass

    def metrics(self):
        return {}


class StubResharder:
    def transfer(self, params, shardings):
        return params, TransferStats(bytes=8, seconds=1e-3)


class StubDataset:
    position = 0


def _loop(tokenizer, trainer, *overrides):
    cfg = load_config(overrides=[f"sampling.group_size={G}", *overrides])
    return SyncLoop(cfg, tokenizer, StubDataset(), trainer, StubSampler(), StubResharder(),
                    rewards=None)


def _samples(rewards_B, truncated_B):
    """2 prompts × G completions; rows 1 and 4 stop early (completion masks of 2 and 1)."""
    b = len(rewards_B)
    rng = np.random.default_rng(0)
    mask = np.ones((b, T), bool)
    mask[1, 2:] = False
    mask[4, 1:] = False
    rewards = np.asarray(rewards_B, np.float32)
    return Samples([{} for _ in range(b)], np.full((b, 2), 5, np.int32), np.ones((b, 2), bool),
                   rng.integers(2, 9, (b, T)).astype(np.int32), mask,
                   rng.normal(-1.0, 0.2, (b, T)).astype(np.float32),
                   np.asarray(truncated_B, bool), rewards, rewards, rewards[:, None])


def _rollout(samples, policy_version=0):
    return Rollout(step=1, policy_version=policy_version, data_position=0, batch=samples,
                   metrics={})


# -- KL penalty in the reward -----------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
KL = [0.4, 0.2, 0.2, 0.0, 0.6, 1.2]
BETA = 0.5


@pytest.mark.parametrize("estimator", ["dr_grpo", "grpo"])
def test_kl_penalty_in_the_reward_shapes_the_advantages(tokenizer, estimator):
    # r' = r - β·KL with β = 0.5:
    #   prompt 0: r = (1, 0, 0), KL = (.4, .2, .2) -> r' = (.8, -.1, -.1), mean .2,
    #             r' - mean = (.6, -.3, -.3)
    #   prompt 1: r = (1, 1, 1), KL = (0, .6, 1.2) -> r' = (1, .7, .4), mean .7,
    #             r' - mean = (.3, 0, -.3): a uniform group gets a signal from the KL alone.
    # dr_grpo: A = r' - mean. grpo: divided by the group's sample std + eps:
    #   sqrt((.36 + .09 + .09)/2) = sqrt(.27) and sqrt((.09 + 0 + .09)/2) = .3.
    # Adding the KL instead (the sign flipped) gives (-.3, 0, .3) on prompt 1.
    # kl/reward_penalty_mean = β·mean(KL) = .5 · 2.6/6; kl/mean = ΣKL / loss tokens = 2.6/19
    # (6 rows of 4 tokens, less 2 + 3 past rows 1 and 4's ends).
    trainer = StubTrainer(KL)
    loop = _loop(tokenizer, trainer, "algorithm.beta=0.5", "algorithm.kl_penalty=reward",
                 f"algorithm.advantage_estimator={estimator}")
    metrics = loop.consume(_rollout(_samples(REWARDS, [False] * 6)))
    centred = np.array([[0.6, -0.3, -0.3], [0.3, 0.0, -0.3]])
    if estimator == "grpo":
        centred = centred / (np.array([[np.sqrt(0.27)], [0.3]]) + 1e-4)
    (batch, off_policy), = trainer.updates
    np.testing.assert_allclose(batch.advantages_B, centred.reshape(-1), rtol=1e-5, atol=1e-6)
    # The same as the estimator on r - β·KL, and not on r + β·KL.
    r = np.asarray(REWARDS, np.float32)
    kl = np.asarray(KL, np.float32)
    want = compute_advantages((r - BETA * kl).reshape(-1, G), estimator).reshape(-1)
    flipped = compute_advantages((r + BETA * kl).reshape(-1, G), estimator).reshape(-1)
    np.testing.assert_allclose(batch.advantages_B, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - flipped).max() > 0.1
    assert metrics["kl/reward_penalty_mean"] == pytest.approx(0.5 * 2.6 / 6, rel=1e-5)
    assert metrics["kl/mean"] == pytest.approx(2.6 / 19, rel=1e-5)
    # The KL was read for the very batch trained on (its loss mask included); on-policy.
    (kl_batch,) = trainer.kl_calls
    np.testing.assert_array_equal(kl_batch.loss_mask_BxT, batch.loss_mask_BxT)
    np.testing.assert_array_equal(kl_batch.completion_tokens_BxT, batch.completion_tokens_BxT)
    assert off_policy is False


def test_kl_in_the_loss_leaves_the_rewards_alone(tokenizer):
    # kl_penalty=loss: no sequence KL is read, and dr_grpo advantages are r - mean:
    # prompt 0: (1, 0, 0) - 1/3; prompt 1: all equal -> exactly 0.
    trainer = StubTrainer(KL)
    loop = _loop(tokenizer, trainer, "algorithm.beta=0.5", "algorithm.kl_penalty=loss",
                 "algorithm.advantage_estimator=dr_grpo")
    metrics = loop.consume(_rollout(_samples(REWARDS, [False] * 6)))
    assert trainer.kl_calls == [] and "kl/reward_penalty_mean" not in metrics
    (batch, _), = trainer.updates
    np.testing.assert_allclose(batch.advantages_B, [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)


def test_a_stale_batch_is_trained_off_policy(tokenizer):
    # The rollout was sampled by version 0; the trainer is at version 2: staleness 2, so the
    # update gets the truncated IS correction (off_policy=True).
    trainer = StubTrainer()
    loop = _loop(tokenizer, trainer, "algorithm.beta=0")
    loop.policy_version = 2
    metrics = loop.consume(_rollout(_samples(REWARDS, [False] * 6), policy_version=0))
    (_, off_policy), = trainer.updates
    assert off_policy is True and metrics["policy/staleness"] == 2.0


# -- DAPO overlong filtering --------------------------------------------------------------------

TRUNCATED = [True, False, False, False, True, False]


@pytest.mark.parametrize("filtering", [True, False])
def test_overlong_filtering_masks_the_loss_of_truncated_rows(tokenizer, filtering):
    trainer = StubTrainer()
    loop = _loop(tokenizer, trainer, "algorithm.beta=0",
                 f"algorithm.overlong_filtering={str(filtering).lower()}")
    samples = _samples([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], TRUNCATED)
    train = loop._train_batch(samples)
    np.testing.assert_array_equal(train.completion_mask_BxT, samples.mask_BxT)
    want = samples.mask_BxT.copy()
    if filtering:
        want[[0, 4]] = False  # the truncated rows: no loss tokens at all
    assert train.loss_mask_BxT.dtype == bool
    np.testing.assert_array_equal(train.loss_mask_BxT, want)
    np.testing.assert_array_equal(train.loss_mask, want)


def test_overlong_filtered_rows_keep_their_reward_in_the_group(tokenizer):
    # Truncated rows 0 and 4 get no loss but still count in their group's statistics:
    # dr_grpo over all G rows, prompt 0: (1, 0, 0) - 1/3 = (2/3, -1/3, -1/3);
    # prompt 1: (1, 0, 1) - 2/3 = (1/3, -2/3, 1/3). Dropping the truncated rows from the
    # statistics would give prompt 0 (0, 0) on its two kept rows instead.
    trainer = StubTrainer()
    loop = _loop(tokenizer, trainer, "algorithm.beta=0", "algorithm.overlong_filtering=true",
                 "algorithm.advantage_estimator=dr_grpo")
    samples = _samples([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], TRUNCATED)
    loop.consume(_rollout(samples))
    (batch, _), = trainer.updates
    np.testing.assert_allclose(batch.advantages_B, [2 / 3, -1 / 3, -1 / 3, 1 / 3, -2 / 3, 1 / 3],
                               atol=1e-6)
    want = samples.mask_BxT.copy()
    want[[0, 4]] = False
    np.testing.assert_array_equal(batch.loss_mask_BxT, want)
    np.testing.assert_array_equal(batch.completion_mask_BxT, samples.mask_BxT)


# -- the trainer batch, the step's metrics, and the helpers produce() uses -------------------


def test_train_batch_pads_prompts_to_the_bucket_and_fixes_its_dtypes(tokenizer):
    # 6 rows of width-2 prompts (token 5); completions as a host pipeline might hand them over:
    # int64 tokens and prompt masks, float64 logprobs.
    s = _samples(REWARDS, [False] * 6)
    s = dataclasses.replace(s, prompt_tokens_BxP=s.prompt_tokens_BxP.astype(np.int64),
                            prompt_mask_BxP=s.prompt_mask_BxP.astype(np.int64),
                            tokens_BxT=s.tokens_BxT.astype(np.int64),
                            logps_BxT=s.logps_BxT.astype(np.float64))
    # prompt_bucket = 4: width 2 -> 4, two masked pad columns on the left.
    train = _loop(tokenizer, StubTrainer(), "sampling.prompt_bucket=4")._train_batch(s)
    pad = tokenizer.pad_id
    np.testing.assert_array_equal(train.prompt_tokens_BxP, [[pad, pad, 5, 5]] * 6)
    np.testing.assert_array_equal(train.prompt_mask_BxP, [[False, False, True, True]] * 6)
    # prompt_bucket = 2: no padding, and still the trainer's dtypes.
    train = _loop(tokenizer, StubTrainer(), "sampling.prompt_bucket=2")._train_batch(s)
    np.testing.assert_array_equal(train.prompt_tokens_BxP, s.prompt_tokens_BxP)
    np.testing.assert_array_equal(train.prompt_mask_BxP, s.prompt_mask_BxP)
    np.testing.assert_array_equal(train.completion_tokens_BxT, s.tokens_BxT)
    np.testing.assert_array_equal(train.completion_mask_BxT, s.mask_BxT)
    np.testing.assert_array_equal(train.advantages_B, np.zeros(6))
    np.testing.assert_allclose(train.sampler_logps_BxT, s.logps_BxT, rtol=1e-6)
    assert [x.dtype for x in (train.prompt_tokens_BxP, train.prompt_mask_BxP,
                              train.completion_tokens_BxT, train.completion_mask_BxT,
                              train.advantages_B, train.sampler_logps_BxT)] == [
        np.int32, bool, np.int32, bool, np.float32, np.float32]
    # Rows come G at a time from one prompt (sampling.share_prompt, on by default).
    assert train.group == G


def test_consume_reports_the_step_and_advances_the_versions(tokenizer):
    # dr_grpo on r = (0, 1, 2 | 1, 1, 1): A = (-1, 0, 1 | 0, 0, 0): mean 0,
    # std sqrt(2/6) = 0.577350, zero_frac 4/6. β = 0: no KL is read even with kl_penalty=reward.
    # The trainer is at version 3 and the batch came from version 2: staleness 1, off-policy;
    # after the update the trainer is at version 4 and has consumed the batch's 42 rows.
    trainer = StubTrainer(KL)
    loop = _loop(tokenizer, trainer, "algorithm.beta=0", "algorithm.kl_penalty=reward",
                 "algorithm.advantage_estimator=dr_grpo")
    loop.policy_version = 3
    rollout = Rollout(step=7, policy_version=2, data_position=42, metrics={"reward/mean": 0.5},
                      batch=_samples([0.0, 1.0, 2.0, 1.0, 1.0, 1.0], [False] * 6))
    metrics = loop.consume(rollout)
    update, reshard = loop.timeline.spans
    assert [(s.phase, s.mesh, s.step) for s in (update, reshard)] == [
        ("update", "trainer", 7), ("reshard", "trainer", 7)]
    # StubResharder moves 8 bytes in 1 ms: 8e-6 GB/s.
    assert metrics == pytest.approx({
        "step": 7.0, "reward/mean": 0.5, "advantages/mean": 0.0,
        "advantages/std": math.sqrt(2 / 6), "advantages/zero_frac": 4 / 6, "loss/total": 0.0,
        "time/update_s": update.end - update.start, "time/reshard_s": 1e-3,
        "reshard/bytes": 8.0, "reshard/gbps": 8e-6, "policy/version": 4.0,
        "policy/staleness": 1.0}, rel=1e-6, abs=1e-7)
    assert trainer.kl_calls == []
    (_, off_policy), = trainer.updates
    assert off_policy is True
    assert (loop.policy_version, loop.consumed_position) == (4, 42)


def test_batch_normalization_reaches_the_advantages(tokenizer):
    # grpo with advantage_normalization=batch on REWARDS (1, 0, 0 | 1, 1, 1): batch mean 2/3,
    # squared deviations 1/9 + 4/9 + 4/9 + 3·1/9 = 12/9, / 5 -> std sqrt(4/15) = 0.516398;
    # group-centred (2/3, -1/3, -1/3 | 0, 0, 0) / (0.516398 + 1e-4).
    trainer = StubTrainer()
    loop = _loop(tokenizer, trainer, "algorithm.beta=0", "algorithm.advantage_estimator=grpo",
                 "algorithm.advantage_normalization=batch")
    loop.consume(_rollout(_samples(REWARDS, [False] * 6)))
    (batch, _), = trainer.updates
    want = np.array([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / (math.sqrt(4 / 15) + 1e-4)
    np.testing.assert_allclose(batch.advantages_B, want, rtol=1e-5, atol=1e-7)


def _part(prompts, prompt_mask, tokens, mask, first_row):
    n = len(tokens)
    f = np.float32
    return Samples([{"row": first_row + i} for i in range(n)], np.array(prompts, np.int32),
                   np.array(prompt_mask, bool), np.array(tokens, np.int32), np.array(mask, bool),
                   -np.array(tokens, f), np.arange(n) % 2 == 1,
                   (first_row + np.arange(n)).astype(f), (first_row + np.arange(n) + 10).astype(f),
                   (first_row + np.arange(n)).astype(f)[:, None])


def test_concat_samples_left_pads_prompts_to_the_widest_part():
    a = _part([[5], [6]], [[1], [1]], [[1, 2], [3, 4]], [[1, 1], [1, 0]], first_row=0)
    b = _part([[7, 8, 9]], [[0, 1, 1]], [[5, 6]], [[1, 1]], first_row=2)
    out = concat_samples([a, b], pad_id=99)
    # a's prompts (width 1) get two masked pad columns on the left; b's (width 3) stay as they are.
    np.testing.assert_array_equal(out.prompt_tokens_BxP, [[99, 99, 5], [99, 99, 6], [7, 8, 9]])
    np.testing.assert_array_equal(out.prompt_mask_BxP, [[0, 0, 1], [0, 0, 1], [0, 1, 1]])
    # Every other field: a's rows, then b's.
    assert out.rows == [{"row": 0}, {"row": 1}, {"row": 2}]
    np.testing.assert_array_equal(out.tokens_BxT, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(out.mask_BxT, [[1, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(out.logps_BxT, [[-1, -2], [-3, -4], [-5, -6]])
    np.testing.assert_array_equal(out.truncated_B, [False, True, False])
    np.testing.assert_array_equal(out.scores_B, [0, 1, 2])
    np.testing.assert_array_equal(out.rewards_B, [10, 11, 12])
    np.testing.assert_array_equal(out.parts_BxF, [[0], [1], [2]])


def test_merge_reward_metrics_of_two_rounds():
    # Failure counts add up, *_max keys take the max, the rest average over the rounds that
    # report them (reward/format only in round 2: 0.2, not 0.1).
    rounds = [
        {"reward/acc": 1.0, "rewards/failures": 1.0, "rewards/failures_timeout": 1.0,
         "rewards/failure_frac": 0.25, "rewards/call_s_max": 2.0},
        {"reward/acc": 0.5, "rewards/failures": 2.0, "rewards/failure_frac": 0.5,
         "rewards/call_s_max": 3.0, "reward/format": 0.2},
    ]
    assert merge_reward_metrics(rounds) == pytest.approx({
        "reward/acc": 0.75, "rewards/failures": 3.0, "rewards/failures_timeout": 1.0,
        "rewards/failure_frac": 0.375, "rewards/call_s_max": 3.0, "reward/format": 0.2})
    assert merge_reward_metrics([]) == {}
