"""Group-relative advantages (controller/advantages.py) against hand-worked numbers."""

import math

import numpy as np
import pytest

from controller.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    rloo_advantages,
    soft_overlong_penalty,
    uniform_groups,
)
from controller.config import AlgorithmConfig, ConfigError, load_config


def test_grpo_advantages_hand_worked():
    # Group [1, 0, 0, 1]: mean 0.5; sample std (ddof=1) = sqrt(4 * 0.25 / 3) = 0.577350.
    # A = ±0.5 / (0.577350 + 1e-4) = ±0.865875.  Group [2, 2, 2, 2]: all 0.
    adv = grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]), eps=1e-4)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    np.testing.assert_allclose(adv[0], [a, -a, -a, a], rtol=1e-6)
    np.testing.assert_allclose(adv[1], 0.0)


def test_grpo_advantages_rejects_groups_of_one():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(np.array([[1.0], [2.0]]))


def test_grpo_batch_normalization_hand_worked():
    # Group means [0.5, 3]; batch std (ddof=1) of [1, 0, 3, 3]: mean 1.75, squared deviations
    # 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, / 3 = 2.25, std 1.5.
    # A = [0.5, -0.5, 0, 0] / (1.5 + 1e-4).
    adv = grpo_advantages(np.array([[1.0, 0.0], [3.0, 3.0]]), eps=1e-4, normalization="batch")
    a = 0.5 / (1.5 + 1e-4)
    np.testing.assert_allclose(adv, [[a, -a], [0.0, 0.0]], rtol=1e-6)


def test_dr_grpo_advantages_hand_worked():
    # mean 0.5, no std: A = r - 0.5.
    adv = dr_grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5]], rtol=1e-6)


def test_rloo_advantages_hand_worked():
    # r = [1, 0, 0]: baselines are the means of the other two: [0, 0.5, 0.5]
    # -> A = [1, -0.5, -0.5]  (= 3/2 · (r - 1/3)).
    adv = rloo_advantages(np.array([[1.0, 0.0, 0.0], [2.0, 4.0, 6.0]]))
    # second group: baselines [5, 4, 3] -> A = [-3, 0, 3]
    np.testing.assert_allclose(adv, [[1.0, -0.5, -0.5], [-3.0, 0.0, 3.0]], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_uniform_groups_get_exactly_zero_advantage(name):
    # mean(0.1, 0.1, 0.1) rounds to 0.10000000000000002 in float64; A must still be exactly 0.
    r = np.array([[0.1, 0.1, 0.1], [0.0, 1.0, 0.2]])
    adv = compute_advantages(r, name)
    assert np.all(adv[0] == 0.0) and np.all(adv[1] != 0.0)
    np.testing.assert_array_equal(uniform_groups(r), [True, False])


def test_unknown_estimator_and_batch_std_without_std():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages(np.ones((1, 2)), "ppo")
    with pytest.raises(ConfigError, match="advantage_normalization='batch' only applies"):
        load_config(overrides=["algorithm.advantage_estimator=dr_grpo",
                               "algorithm.advantage_normalization=batch"])


def test_soft_overlong_penalty_hand_worked():
    # L_max = 6, L_cache = 2: free up to 4 tokens; 5 -> (4 - 5)/2 = -0.5; 6 -> -1; 7 -> -1.
    pen = soft_overlong_penalty(np.array([3, 4, 5, 6, 7]), max_len=6, buffer_len=2)
    np.testing.assert_allclose(pen, [0.0, 0.0, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(
        soft_overlong_penalty(np.array([5]), max_len=6, buffer_len=2, factor=0.5), [-0.25])


def test_config_cross_checks_for_the_update_shape():
    with pytest.raises(ConfigError, match=r"overlong_buffer_len=6 must be shorter"):
        load_config(overrides=["algorithm.overlong_buffer_len=6"])
    with pytest.raises(ConfigError, match=r"= 3 does not divide the batch of 128 rows"):
        load_config(overrides=["algorithm.num_minibatches=3"])


def test_every_estimator_choice_has_a_registry_entry():
    field = AlgorithmConfig.model_fields["advantage_estimator"]
    assert set(field.annotation.__args__) == set(ADVANTAGE_ESTIMATORS)


def test_grpo_default_eps_and_batch_normalization_of_any_batch_shape():
    # The first test's group with eps left at its default 1e-4: A = ±0.5 / (0.577350 + 1e-4).
    adv = grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0]]))
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    np.testing.assert_allclose(adv, [[a, -a, -a, a]], rtol=1e-6)
    # 3 prompts × G = 3, normalization passed through compute_advantages (the loop's call).
    # Batch mean 2; squared deviations 4+1+1 + 1+0+1 + 0 = 8, / (9 - 1) = 1: batch std 1
    # (prompt 0's own std would be sqrt(3)). Group means [2, 2, 2]: A = (r - 2) / (1 + 1e-4).
    r = np.array([[0.0, 3.0, 3.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    adv = compute_advantages(r, "grpo", 1e-4, "batch")
    np.testing.assert_allclose(adv, (r - 2.0) / (1.0 + 1e-4), rtol=1e-6)
    # The smallest batch, one prompt of G = 2: [1, 0] has batch std sqrt(0.5) = 0.707107.
    adv = grpo_advantages(np.array([[1.0, 0.0]]), normalization="batch")
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    np.testing.assert_allclose(adv, [[a, -a]], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_advantages_and_the_overlong_penalty_are_float32(name):
    # The trainer batch holds float32; a float64 array would be a silent cast (or a copy).
    assert compute_advantages(np.array([[1.0, 0.0, 2.0]]), name).dtype == np.float32
    assert soft_overlong_penalty(np.array([5]), max_len=6, buffer_len=2).dtype == np.float32


def test_normalizations_an_estimator_cannot_use_are_errors():
    r = np.array([[1.0, 0.0]])
    for fn in (dr_grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match=r"divides by no std: normalization must be 'group'"):
            fn(r, 1e-4, "batch")
    with pytest.raises(ValueError, match=r"unknown advantage normalization 'prompt'"):
        grpo_advantages(r, normalization="prompt")


def test_soft_overlong_penalty_buffer_bounds():
    # L_cache must lie in (0, L_max): 0 and L_max are errors, 1 and L_max - 1 are not.
    for bad in (0, 6):
        with pytest.raises(ValueError, match=rf"buffer_len={bad} must be in \(0, max_len=6\)"):
            soft_overlong_penalty(np.array([3]), max_len=6, buffer_len=bad)
    # L_cache = 1: free up to 5 tokens; 6 -> (5 - 6)/1 = -1; 7 -> -1.
    np.testing.assert_allclose(
        soft_overlong_penalty(np.array([5, 6, 7]), max_len=6, buffer_len=1), [0.0, -1.0, -1.0])
    # L_cache = 5: free up to 1 token; 2 -> (1 - 2)/5 = -0.2; 6 -> (1 - 6)/5 = -1.
    np.testing.assert_allclose(
        soft_overlong_penalty(np.array([1, 2, 6]), max_len=6, buffer_len=5), [0.0, -0.2, -1.0],
        rtol=1e-6)
