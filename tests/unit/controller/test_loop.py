"""The trainer side of a step (`Loop.consume`, `Loop._train_batch`) with a stub trainer: the KL
penalty in the reward and DAPO's overlong filtering, on hand-worked batches."""

import numpy as np
import pytest

from controller.advantages import compute_advantages
from controller.config import load_config
from controller.loop import Rollout, Samples, SyncLoop
from reshard.transfer import TransferStats

G = 3  # completions per prompt
T = 4  # completion tokens


class StubTrainer:
    """What `Loop.consume` uses of a `Trainer`: a known per-row KL, and an update that records
    the batch it was handed."""

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
                   np.asarray(truncated_B, bool), rewards, rewards)


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
