"""The GRPO loss family (trainer/loss.py) against hand-worked numbers: KL estimators,
aggregation modes, clipped surrogates (symmetric, asymmetric, dual, sequence-level), the KL and
entropy terms, masking, and gradients against finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import AlgorithmConfig
from trainer.loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LOG_RATIOS,
    aggregate,
    aggregation_weights,
    clipped_surrogate,
    grpo_loss,
    kl_k3,
)

LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------------
# KL estimators and aggregation


def test_kl_estimators_hand_worked():
    # log π_θ = 0, log π_ref = ln 2 (d = ln 2):
    # k1 = 0 - ln 2 = -0.693147;  k2 = (ln 2)² / 2 = 0.240227;  k3 = 2 - ln 2 - 1 = 0.306853.
    lp, ref = jnp.array([0.0, -1.0]), jnp.array([LN2, -1.0])
    np.testing.assert_allclose(KL_ESTIMATORS["k1"](lp, ref), [-LN2, 0.0], atol=1e-6)
    np.testing.assert_allclose(KL_ESTIMATORS["k2"](lp, ref), [LN2**2 / 2, 0.0], atol=1e-6)
    np.testing.assert_allclose(KL_ESTIMATORS["k3"](lp, ref), [1 - LN2, 0.0], atol=1e-6)
    # The same k3 called directly: d = ln 2 -> e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853.
    np.testing.assert_allclose(kl_k3(lp, ref), [2 - LN2 - 1, 0.0], atol=1e-6)


PER_TOKEN = jnp.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the 99s are padding; row 2 is empty


@pytest.mark.parametrize(("mode", "norm_length", "want"), [
    ("token-mean", None, 2.5),                 # (1 + 2 + 3 + 4) / 4
    ("seq-mean-token-mean", None, 3.0),        # mean(2, 4) over the 2 non-empty rows
    ("seq-mean-token-sum", None, 5.0),         # mean(6, 4)
    ("seq-mean-token-sum-norm", None, 10 / 9),  # (6 + 4) / (B=3 · T=3)
    ("seq-mean-token-sum-norm", 5, 10 / 15),   # (6 + 4) / (B=3 · L=5): Dr.GRPO's constant
])
def test_aggregation_modes_hand_worked(mode, norm_length, want):
    assert float(aggregate(PER_TOKEN, MASK, mode, norm_length)) == pytest.approx(want, rel=1e-6)
    w = aggregation_weights(MASK, mode, norm_length)
    assert float(jnp.sum(jnp.where(MASK == 0, jnp.abs(w), 0.0))) == 0.0


def test_token_mean_and_sequence_mean_hand_worked():
    per_token = jnp.array([[-1.0, -1.0], [1.0, 99.0]])
    mask = jnp.array([[1, 1], [1, 0]])  # the 99 is padding and must not count
    # token-mean: (-1 - 1 + 1) / 3 = -1/3; seq-mean-token-mean: mean(-1, 1) = 0.
    assert float(aggregate(per_token, mask, "token-mean")) == pytest.approx(-1 / 3)
    assert float(aggregate(per_token, mask, "seq-mean-token-mean")) == pytest.approx(0.0)


def test_every_loss_choice_has_a_registry_entry():
    # (advantage_estimator: tests/unit/controller/test_advantages.py)
    fields = AlgorithmConfig.model_fields
    for field, registry in (("loss_aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
                            ("importance_sampling_level", LOG_RATIOS)):
        assert set(fields[field].annotation.__args__) == set(registry), field


# ---------------------------------------------------------------------------------------------
# Policy losses


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


def test_asymmetric_clip_hand_worked():
    # ε_low = 0.2, ε_high = 0.28 (DAPO).
    # ρ 1.5, A +1 -> clipped at 1.28 -> L = -1.28          (high clip)
    # ρ 0.5, A -1 -> max(0.5, 0.8) = 0.8 -> L = +0.8        (low clip)
    # ρ 1.1, A +1 -> unclipped -> L = -1.1
    # token-mean: (-1.28 + 0.8 - 1.1) / 3 = -0.526667
    logps = jnp.log(jnp.array([[1.5], [0.5], [1.1]]))
    loss, aux = grpo_loss(logps, jnp.zeros((3, 1)), None, jnp.array([1.0, -1.0, 1.0]),
                          jnp.ones((3, 1)), epsilon_low=0.2, epsilon_high=0.28)
    assert float(loss) == pytest.approx((-1.28 + 0.8 - 1.1) / 3, abs=1e-6)
    assert float(aux["clip/high_frac"]) == pytest.approx(1 / 3)
    assert float(aux["clip/low_frac"]) == pytest.approx(1 / 3)
    assert float(aux["ratio/max"]) == pytest.approx(1.5, rel=1e-6)
    assert float(aux["ratio/min"]) == pytest.approx(0.5, rel=1e-6)
    assert float(aux["ratio/mean"]) == pytest.approx(3.1 / 3, rel=1e-6)


def test_dual_clip_hand_worked():
    # c = 3, ε = 0.2.  ρ 5, A -1: max(5, 1.2) = 5, dual-clipped to min(5, 3) = 3.
    # ρ 2, A -1: max(2, 1.2) = 2 < 3 -> 2.   ρ 5, A +1: -min(5, 1.2) = -1.2 (dual clip only
    # acts on A < 0).  token-mean: (3 + 2 - 1.2) / 3 = 1.266667.
    logps = jnp.log(jnp.array([[5.0], [2.0], [5.0]]))
    adv = jnp.array([-1.0, -1.0, 1.0])

    def f(lp):
        return grpo_loss(lp, jnp.zeros((3, 1)), None, adv, jnp.ones((3, 1)), epsilon=0.2,
                         dual_clip_c=3.0)

    loss, aux = f(logps)
    assert float(loss) == pytest.approx((3 + 2 - 1.2) / 3, abs=1e-5)
    assert float(aux["clip/dual_frac"]) == pytest.approx(1 / 3)
    # Clipped tokens carry no gradient; the unclipped one: d(ρ·1/3)/dlogp = ρ/3 = 2/3.
    g = jax.grad(lambda lp: f(lp)[0])(logps)
    np.testing.assert_allclose(g[:, 0], [0.0, 2 / 3, 0.0], atol=1e-6)


def test_clipped_surrogate_indicators_need_the_matching_advantage_sign():
    # ρ 1.5 with A < 0 is not "high-clipped" (the min picks the unclipped term): L = 1.5.
    pg, ind = clipped_surrogate(jnp.array([1.5]), jnp.array([-1.0]), clip_low=0.2,
                                clip_high=0.2)
    assert float(pg[0]) == pytest.approx(1.5) and float(ind["high"][0]) == 0.0


def test_gspo_sequence_ratio_hand_worked():
    # Row 0: log ρ = [ln 2, 0] -> log s = ln 2 / 2, s = √2 = 1.414214; A = +1 -> clipped at 1.2
    #        -> L = -1.2 on both tokens.
    # Row 1: log ρ = [ln 1.1, ln 1.1], third token padding (garbage 50) -> s = 1.1; A = -1:
    #        max(1.1, clip 1.1) = 1.1 -> L = +1.1.
    # seq-mean-token-mean: (-1.2 + 1.1) / 2 = -0.05.
    logps = jnp.array([[LN2, 0.0, 0.0], [math.log(1.1), math.log(1.1), 50.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])

    def f(lp):
        return grpo_loss(lp, jnp.zeros((2, 3)), None, jnp.array([1.0, -1.0]), mask,
                         epsilon=0.2, importance_sampling_level="sequence",
                         aggregation="seq-mean-token-mean")

    loss, aux = f(logps)
    assert float(loss) == pytest.approx(-0.05, abs=1e-6)
    assert float(aux["ratio/max"]) == pytest.approx(math.sqrt(2), rel=1e-6)
    # Gradient: row 0 clipped -> 0. Row 1: L = -A·s/S, ds/dlogp_t = s/|y| -> 1.1 / (2·2) = 0.275.
    g = jax.grad(lambda lp: f(lp)[0])(logps)
    np.testing.assert_allclose(g, [[0, 0, 0], [0.275, 0.275, 0]], atol=1e-6)


def test_kl_and_entropy_terms_hand_worked():
    # ρ = 1, A = [2, -1]: L_pg = [-2, +1] on the 3 real tokens: token-mean (-2 - 2 + 1)/3 = -1.
    # k2 at token (0,0): (0 - ln 2)²/2 = 0.240227; β = 0.5 -> β·Σ/3 = 0.040038.
    # entropy [[1, 2], [3, pad]] -> token-mean 2; coef 0.1 -> -0.2.
    logps = jnp.zeros((2, 2))
    ref = jnp.array([[LN2, 0.0], [0.0, 5.0]])
    ent = jnp.array([[1.0, 2.0], [3.0, 1e9]])
    mask = jnp.array([[1, 1], [1, 0]])
    loss, aux = grpo_loss(logps, logps, ref, jnp.array([2.0, -1.0]), mask, beta=0.5,
                          kl_estimator="k2", entropy_BxT=ent, entropy_coef=0.1)
    k2 = LN2**2 / 2
    assert float(loss) == pytest.approx(-1.0 + 0.5 * k2 / 3 - 0.2, abs=1e-5)
    assert float(aux["kl/mean"]) == pytest.approx(k2 / 3, abs=1e-6)
    assert float(aux["policy/entropy"]) == pytest.approx(2.0, abs=1e-6)
    assert float(aux["loss/policy"]) == pytest.approx(-1.0, abs=1e-6)


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


# Every aggregation × ratio level; the KL estimators take turns (each is elementwise).
_CASES = [(agg, level, sorted(KL_ESTIMATORS)[i % 3]) for i, (agg, level) in enumerate(
    (a, lv) for a in sorted(AGGREGATIONS) for lv in ("token", "sequence"))]


@pytest.mark.parametrize(("agg", "level", "est"), _CASES)
def test_masked_tokens_never_contribute(agg, level, est):
    # The same loss and gradient whatever sits under the mask, even NaN and inf.
    rng = np.random.default_rng(0)
    lp = jnp.asarray(rng.normal(-1.0, 0.3, (3, 4)), jnp.float32)
    old = lp + jnp.asarray(rng.normal(0, 0.1, (3, 4)), jnp.float32)
    ref = lp + jnp.asarray(rng.normal(0, 0.1, (3, 4)), jnp.float32)
    ent = jnp.asarray(rng.uniform(0, 2, (3, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    adv = jnp.array([1.0, -0.5, 0.3])

    def f(lp, old, ref, ent):
        return grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, dual_clip_c=3.0, beta=0.1,
                         kl_estimator=est, aggregation=agg, importance_sampling_level=level,
                         entropy_BxT=ent, entropy_coef=0.01)[0]

    f = jax.jit(f)
    pad = mask == 0
    dirty = [jnp.where(pad, v, x) for x, v in ((lp, 80.0), (old, -jnp.inf), (ref, jnp.nan),
                                                 (ent, jnp.inf))]
    clean_loss, clean_grad = jax.value_and_grad(f)(lp, old, ref, ent)
    dirty_loss, dirty_grad = jax.value_and_grad(f)(*dirty)
    assert np.isfinite(float(clean_loss))
    assert float(dirty_loss) == pytest.approx(float(clean_loss), abs=1e-6)
    np.testing.assert_allclose(dirty_grad, clean_grad, atol=1e-6)
    assert float(jnp.abs(jnp.where(pad, dirty_grad, 0.0)).sum()) == 0.0


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_gradient_matches_finite_differences(agg, level):
    # A tiny categorical policy: logits_BxTxV -> logps of fixed tokens and entropy; the loss
    # has the clipped surrogate (ratios away from the clip kinks), k3 KL and entropy bonus.
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(0, 1, (2, 3, 4)))
        tokens = jnp.array([[0, 2, 1], [3, 3, 0]])
        old = jnp.asarray(rng.normal(-1.4, 0.05, (2, 3)))
        ref = jnp.asarray(rng.normal(-1.4, 0.3, (2, 3)))
        mask = jnp.array([[1, 1, 0], [1, 1, 1]])
        adv = jnp.array([0.7, -1.2])

        def f(x):
            logp = jax.nn.log_softmax(x, axis=-1)
            lp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
            ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
            return grpo_loss(lp, old, ref, adv, mask, epsilon=0.9, epsilon_high=2.0,
                             dual_clip_c=10.0, beta=0.1, aggregation=agg,
                             importance_sampling_level=level, entropy_BxT=ent,
                             entropy_coef=0.05)[0]

        f = jax.jit(f)
        g = np.asarray(jax.grad(f)(logits))
        h = 1e-6
        fd = np.zeros_like(g)
        for idx in np.ndindex(*logits.shape):
            e = np.zeros(logits.shape)
            e[idx] = h
            fd[idx] = (float(f(logits + e)) - float(f(logits - e))) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-7, rtol=1e-6)
        assert np.abs(g).sum() > 0


def test_grpo_mu1_no_kl_is_the_plain_policy_gradient():
    # With π_old = sg(π_θ) (μ = 1) and β = 0 the ratio is 1 in value and
    # ∇L = -Σ_bt m A_b ∇log π_bt / Σ m: REINFORCE with the group-relative advantage.
    rng = np.random.default_rng(2)
    lp = jnp.asarray(rng.normal(-1.0, 0.5, (3, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = jnp.array([1.5, -0.5, -1.0])

    def grpo(x):
        return grpo_loss(x, jax.lax.stop_gradient(x), None, adv, mask, epsilon=0.2)[0]

    def reinforce(x):
        return -jnp.sum(adv[:, None] * x * mask) / jnp.sum(mask)

    # In value the surrogate is -Σ m A / Σ m (ratio 1): -(3·1.5 - 2·0.5 - 4·1.0) / 9 = 1/18.
    assert float(grpo(lp)) == pytest.approx(1 / 18, abs=1e-6)
    np.testing.assert_allclose(jax.grad(grpo)(lp), jax.grad(reinforce)(lp), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Edge cases, defaults and diagnostics


def test_aggregation_with_one_real_token_or_row_in_a_wide_batch():
    per_token = jnp.array([[3.0, 5.0, 7.0], [11.0, 13.0, 17.0]])  # B = 2, T = 3
    # One real token (5): every mean is 5 (1 token, 1 row); the sum-norm is 5 / (B·T = 6).
    one_token = jnp.array([[0, 1, 0], [0, 0, 0]])
    # One real row (3, 5, 7): token-mean and seq-mean-token-mean 15/3 = 5; seq-mean-token-sum
    # 15 / (S = 1 row) = 15; seq-mean-token-sum-norm 15 / (B·T = 6) = 2.5.
    one_row = jnp.array([[1, 1, 1], [0, 0, 0]])
    for mask, want in ((one_token, (5.0, 5.0, 5.0, 5 / 6)), (one_row, (5.0, 5.0, 15.0, 2.5))):
        got = [float(aggregate(per_token, mask, mode)) for mode in (
            "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")]
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_with_a_single_real_token(level):
    # One real token with ρ = 2 (row 1 is all padding), A = +1, ε = 1.5 (no clip):
    # L = -2 (token-mean over 1 token); GSPO's s = exp(ln 2 / 1) = 2 as well.
    # approx KL = ρ - 1 - ln ρ = 1 - ln 2 = 0.306853; ratio/mean = 2.
    logps = jnp.array([[LN2, 9.0], [9.0, 9.0]])
    mask = jnp.array([[1, 0], [0, 0]])
    loss, aux = grpo_loss(logps, jnp.zeros((2, 2)), None, jnp.array([1.0, -1.0]), mask,
                          epsilon=1.5, importance_sampling_level=level)
    assert float(loss) == pytest.approx(-2.0, abs=1e-6)
    assert float(aux["ratio/mean"]) == pytest.approx(2.0, abs=1e-6)
    assert float(aux["ratio/max"]) == pytest.approx(2.0, abs=1e-6)
    assert float(aux["policy/approx_kl"]) == pytest.approx(1 - LN2, abs=1e-6)


def test_grpo_loss_defaults_and_a_separate_epsilon_low():
    # Defaults: ε = 0.2, β = 0 (a reference passed in is not used: no KL term, no KL
    # metrics), entropy_coef = 0 (the entropy is reported, not added).
    # ρ 1.5, A +1 -> clipped at 1.2 -> L = -1.2.
    one = jnp.ones((1, 1))
    loss, aux = grpo_loss(jnp.log(1.5 * one), 0 * one, LN2 * one, jnp.array([1.0]), one,
                          entropy_BxT=2.0 * one)
    assert float(loss) == pytest.approx(-1.2, abs=1e-6)
    assert "loss/kl" not in aux and "kl/mean" not in aux
    assert float(aux["loss/entropy"]) == pytest.approx(2.0)
    # ε_low = 0.1 with ε = 0.2: ρ 0.5, A -1 -> max(0.5, 0.9) = 0.9; ρ 1.5, A +1 -> ε_high
    # falls back to ε: -1.2. token-mean (0.9 - 1.2) / 2 = -0.15.
    loss, _ = grpo_loss(jnp.log(jnp.array([[0.5], [1.5]])), jnp.zeros((2, 1)), None,
                        jnp.array([-1.0, 1.0]), jnp.ones((2, 1)), epsilon=0.2, epsilon_low=0.1)
    assert float(loss) == pytest.approx(-0.15, abs=1e-6)


def test_grpo_loss_given_weights_and_norm_length():
    # ρ = 1, A = [2, -1]: L_pg = [[-2, -2], [1, pad]].
    logps = jnp.zeros((2, 2))
    mask = jnp.array([[1, 1], [1, 0]])
    adv = jnp.array([2.0, -1.0])
    # weights_BxT replaces the aggregation weights: 0.5·(-2) + 0.25·(-2) + 1·1 = -0.5.
    w = jnp.array([[0.5, 0.25], [1.0, 0.0]])
    loss, _ = grpo_loss(logps, logps, None, adv, mask, weights_BxT=w)
    assert float(loss) == pytest.approx(-0.5, abs=1e-6)
    # Dr.GRPO's constant L = 5: (-2 - 2 + 1) / (B·L = 10) = -0.3 (T = 2 would give -0.75).
    loss, _ = grpo_loss(logps, logps, None, adv, mask, aggregation="seq-mean-token-sum-norm",
                        norm_length=5)
    assert float(loss) == pytest.approx(-0.3, abs=1e-6)


def test_clipped_surrogate_at_and_around_each_boundary():
    # ε_low = ε_high = 0.25 (clip range [0.75, 1.25], exact in binary), dual clip c = 3.
    # Per token: L = max(-ρA, -clip(ρ)A), then min(L, -cA) where A < 0.
    ratio_adv_want = [
        # ρ     A     L      low high dual
        (0.5, 0.0, 0.0, 0, 0, 0),      # A = 0 is neither sign: no indicator
        (0.5, 0.5, -0.25, 0, 0, 0),    # A > 0, ρ low: unclipped (-0.25 > -0.375)
        (1.0, -1.0, 1.0, 0, 0, 0),     # inside the range
        (0.75, -1.0, 0.75, 0, 0, 0),   # exactly 1 - ε: not below it
        (1.1, -1.0, 1.1, 0, 0, 0),     # inside, A < 0
        (1.25, 1.0, -1.25, 0, 0, 0),   # exactly 1 + ε: not above it
        (1.5, 0.0, 0.0, 0, 0, 0),      # A = 0
        (3.0, -1.0, 3.0, 0, 0, 0),     # L = 3 = -cA exactly: the dual clip does not bind
        (5.0, -2.0, 6.0, 0, 0, 1),     # L = 10 > -cA = 6: dual-clipped to 6
        (0.5, -1.0, 0.75, 1, 0, 0),    # low clip: max(0.5, 0.75)
        (1.5, 1.0, -1.25, 0, 1, 0),    # high clip: max(-1.5, -1.25)
    ]
    ratio, adv, want, low, high, dual = (jnp.array(c) for c in zip(*ratio_adv_want, strict=True))
    pg, ind = clipped_surrogate(ratio, adv, clip_low=0.25, clip_high=0.25, dual_clip_c=3.0)
    np.testing.assert_allclose(pg, want, atol=1e-6)
    for k, v in (("low", low), ("high", high), ("dual", dual)):
        assert ind[k].dtype == jnp.float32, k
        np.testing.assert_array_equal(ind[k], v, err_msg=k)


def test_unknown_loss_options_name_the_known_ones():
    x = jnp.zeros((1, 1))
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'sum' \(known: \['seq-"):
        aggregation_weights(x, "sum")
    with pytest.raises(ValueError, match=r"level 'word' \(known: \['sequence', 'token'\]\)"):
        grpo_loss(x, x, None, jnp.ones(1), x + 1, importance_sampling_level="word")
    with pytest.raises(ValueError, match=r"kl_estimator 'k4' \(known: \['k1', 'k2', 'k3'\]\)"):
        grpo_loss(x, x, x, jnp.ones(1), x + 1, beta=0.1, kl_estimator="k4")


def test_kl_term_and_approx_kl_diagnostics_hand_worked():
    # A = 0 (no policy term). log π_θ = [ln 2, 0], π_old = π_ref = 0:
    # k1 = [ln 2, 0] -> kl/mean = ln 2 / 2 = 0.346574; loss/kl = β · 0.346574 = 0.173287 (β = 0.5),
    # and that is the whole loss. approx KL(π_old ‖ π_θ) by k3 on log ρ = [ln 2, 0]:
    # ((2 - 1 - ln 2) + 0) / 2 = 0.153426.
    logps = jnp.array([[LN2, 0.0]])
    zeros = jnp.zeros((1, 2))
    loss, aux = grpo_loss(logps, zeros, zeros, jnp.array([0.0]), jnp.ones((1, 2)), beta=0.5,
                          kl_estimator="k1")
    assert float(aux["kl/mean"]) == pytest.approx(LN2 / 2, abs=1e-6)
    assert float(aux["loss/kl"]) == pytest.approx(0.5 * LN2 / 2, abs=1e-6)
    assert float(loss) == pytest.approx(0.5 * LN2 / 2, abs=1e-6)
    assert float(aux["policy/approx_kl"]) == pytest.approx((1 - LN2) / 2, abs=1e-6)
