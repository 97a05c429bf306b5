"""Advantages, losses and KL against hand-worked numbers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from controller.advantages import grpo_advantages
from trainer.loss import aggregate, grpo_loss, kl_k3


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


def test_kl_k3_hand_worked():
    # d = log π_ref - log π = ln 2:  e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853.
    kl = kl_k3(jnp.array([0.0, -1.0]), jnp.array([math.log(2.0), -1.0]))
    np.testing.assert_allclose(kl, [2 - math.log(2) - 1, 0.0], atol=1e-6)


def test_aggregation_modes_hand_worked():
    per_token = jnp.array([[-1.0, -1.0], [1.0, 99.0]])
    mask = jnp.array([[1, 1], [1, 0]])  # the 99 is padding and must not count
    # token-mean: (-1 - 1 + 1) / 3 = -1/3; seq-mean-token-mean: mean(-1, 1) = 0.
    assert float(aggregate(per_token, mask, "token-mean")) == pytest.approx(-1 / 3)
    assert float(aggregate(per_token, mask, "seq-mean-token-mean")) == pytest.approx(0.0)


def test_grpo_loss_clipping_hand_worked():
    # Row 0: A = +1, ratio 1.5 -> min(1.5, clip 1.2) = 1.2 -> pg = -1.2.
    # Row 1: A = -1, ratio 0.5 -> min(-0.5, -0.8) = -0.8 -> pg = +0.8.
    # token-mean over 2 tokens: (-1.2 + 0.8) / 2 = -0.2; one of two tokens clipped... both are.
    old = jnp.zeros((2, 1))
    logps = jnp.log(jnp.array([[1.5], [0.5]]))
    loss, aux = grpo_loss(logps, old, None, jnp.array([1.0, -1.0]), jnp.ones((2, 1)),
                          epsilon=0.2, beta=0.0)
    assert float(loss) == pytest.approx(-0.2, abs=1e-6)
    assert float(aux["loss/clip_frac"]) == pytest.approx(1.0)


def test_grpo_loss_with_kl_and_masking_hand_worked():
    # ratio 1, A = [2, -1]: pg = [-2, +1] on real tokens; KL: token (0,0) has d = ln 2
    # (0.306853), others 0. β = 0.5, token-mean over 3 real tokens:
    # (-2 + 0.5 * 0.306853 - 2 + 1) / 3 = -0.948858.
    logps = jnp.zeros((2, 2))
    ref = jnp.array([[math.log(2.0), 0.0], [0.0, 5.0]])  # the 5.0 sits on padding
    mask = jnp.array([[1, 1], [1, 0]])
    loss, aux = grpo_loss(logps, logps, ref, jnp.array([2.0, -1.0]), mask, epsilon=0.2,
                          beta=0.5)
    k = 2 - math.log(2) - 1
    assert float(loss) == pytest.approx((-2 + 0.5 * k - 2 + 1) / 3, abs=1e-6)
    assert float(aux["kl/mean"]) == pytest.approx(k / 3, abs=1e-6)
    assert float(aux["loss/policy"]) == pytest.approx(-1.0, abs=1e-6)
