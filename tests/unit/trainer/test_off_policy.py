"""Off-policy pieces of the update, against plain references: the truncated importance weight
w = min(π_θ/μ, C) on stale batches, and the per-row KL(π_θ ‖ π_ref) that KL-in-the-reward
subtracts from the rewards."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from controller.config import AlgorithmConfig, ModelConfig
from trainer.logprobs import sequence_logprobs
from trainer.trainer import TrainBatch, Trainer

B, P, T = 8, 3, 4
CAP = 2.0  # C
LR = 0.1
# π_θ/μ per token, cycled over the batch: above C (3, 4: capped to 2), below 1, between 1 and
# C, and exactly 1.
RATIOS = [3.0, 0.5, 1.5, 0.25, 4.0, 1.0]


@pytest.fixture(scope="module")
def small_model(tokenizer):
    """1 layer, d=16: the arithmetic of the update is under test, so compile as little as we can."""
    from trainer.model import ModelSpec, define_model, init_params

    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
    spec = ModelSpec.from_config(cfg, tokenizer.vocab_size)
    return define_model(spec), init_params(spec, seed=11)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


@pytest.fixture(scope="module")
def batch(tokenizer):
    rng = np.random.default_rng(4)
    v = tokenizer.vocab_size
    prompt = rng.integers(2, v, (B, P)).astype(np.int32)
    pmask = np.ones((B, P), bool)
    pmask[:3, 0] = False  # left padding
    comp = rng.integers(2, v, (B, T)).astype(np.int32)
    cmask = np.ones((B, T), bool)
    cmask[2, 2:] = False  # short completions
    cmask[5, 1:] = False
    loss_mask = cmask.copy()
    loss_mask[6] = False  # an overlong-filtered row: no loss, no KL
    adv = np.array([1.0, -0.5, 2.0, -1.5, 0.7, -1.0, 1.2, 0.3], np.float32)
    return TrainBatch(prompt, pmask, comp, cmask, adv, np.zeros((B, T), np.float32), loss_mask)


def _plain_logps(mdef, params, b):
    b = jax.tree.map(jnp.asarray, b)
    fn = jax.jit(lambda p, *xs: sequence_logprobs(mdef, p, *xs, 1.0))
    return np.asarray(fn(params, b.prompt_tokens_BxP, b.prompt_mask_BxP, b.completion_tokens_BxT,
                         b.completion_mask_BxT), np.float64)


def _trainer(small_model, meshes, lr=LR, **algo):
    mdef, params = small_model
    cfg = AlgorithmConfig(**{"beta": 0.0, "loss_aggregation": "seq-mean-token-mean", **algo})
    # A host copy: the trainer donates its state, which must not alias the shared fixture.
    return Trainer(mdef, _host(params), optax.sgd(lr), meshes.trainer, cfg, temperature=1.0,
                   is_cap=CAP, layered=False)


# -- truncated importance sampling ----------------------------------------------------------


@pytest.fixture(scope="module")
def stale_batch(small_model, batch):
    """The batch with behaviour logprobs μ = log π_θ - log(RATIOS[k]) on real tokens, so the
    current policy's ratio π_θ/μ is RATIOS[k] there (μ = 0 on padding, as the sampler emits)."""
    mdef, params = small_model
    lp = _plain_logps(mdef, params, batch)
    mu = np.zeros((B, T), np.float32)
    k = 0
    for b in range(B):
        for t in range(T):
            if batch.completion_mask_BxT[b, t]:
                mu[b, t] = lp[b, t] - math.log(RATIOS[k % len(RATIOS)])
                k += 1
    return dataclasses.replace(batch, sampler_logps_BxT=mu)


def _reference_step(small_model, b, is_weighted):
    """(params after one SGD step, loss, mean IS weight) by a plain loop over the tokens.

    μ = 1 and one minibatch, so π_old = sg(π_θ): the ratio is exactly 1, no clip binds, and
    the GRPO surrogate is L = -Σ_bt W_bt · A_b w_bt · π_θ/sg(π_θ) with the seq-mean-token-mean
    weights W_bt = m_bt / (|y_b| · S) and w_bt = min(exp(sg log π_θ - μ), C) (or 1).
    """
    mdef, params = small_model
    lp = _plain_logps(mdef, params, b)  # sg(log π_θ): the weights carry no gradient
    m = b.loss_mask_BxT
    n_B = m.sum(axis=1)
    s = int((n_B > 0).sum())  # S = 7: row 6 has no loss tokens
    coef = np.zeros((B, T), np.float32)  # W_bt · A_b · w_bt
    w_sum, n_tok = 0.0, 0
    for i in range(B):
        for t in range(T):
            if not m[i, t]:
                continue
            w = min(math.exp(lp[i, t] - b.sampler_logps_BxT[i, t]), CAP) if is_weighted else 1.0
            coef[i, t] = float(b.advantages_B[i]) * w / (n_B[i] * s)
            w_sum, n_tok = w_sum + w, n_tok + 1
    jb = jax.tree.map(jnp.asarray, b)

    def surrogate(p):
        logps = sequence_logprobs(mdef, p, jb.prompt_tokens_BxP, jb.prompt_mask_BxP,
                                  jb.completion_tokens_BxT, jb.completion_mask_BxT, 1.0)
        return -jnp.sum(coef * jnp.exp(logps - jax.lax.stop_gradient(logps)))

    loss, g = jax.jit(jax.value_and_grad(surrogate))(params)
    want = jax.tree.map(lambda x, gx: x - LR * gx, params, g)
    return _host(want), float(loss), w_sum / n_tok


def _assert_params_close(got, want):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_stale_batch_reweights_each_token_by_the_truncated_is_ratio(small_model, meshes,
                                                                     stale_batch):
    # Per token the advantage is A_b · min(π_θ/μ, C): with C = 2 the ratios (3, .5, 1.5, .25, 4,
    # 1) weigh (2, .5, 1.5, .25, 2, 1). E.g. row 0 (A = 1, 4 tokens, S = 7) contributes
    # -(2 + .5 + 1.5 + .25)/(4·7) = -4.25/28 to the loss. Weights unapplied (w = 1) or
    # uncapped (3 and 4 kept) move both the loss and the step.
    trainer = _trainer(small_model, meshes)
    aux = jax.device_get(trainer.update(stale_batch, off_policy=True))
    want_params, want_loss, want_w = _reference_step(small_model, stale_batch, True)
    assert aux["loss/policy"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert aux["policy/is_weight_mean"] == pytest.approx(want_w, rel=1e-4)
    assert aux["ratio/mean"] == pytest.approx(1.0)  # π_old = sg(π_θ): the clip never binds
    _assert_params_close(_host(trainer.params), want_params)
    # The reference itself is not the unweighted one (the batch does exercise w ≠ 1).
    _, unweighted_loss, _ = _reference_step(small_model, stale_batch, False)
    assert abs(want_loss - unweighted_loss) > 1e-2


def test_on_policy_batch_ignores_the_behaviour_logprobs(small_model, meshes, stale_batch):
    # off_policy=False: w = 1 whatever μ says; the step is the plain policy-gradient step.
    trainer = _trainer(small_model, meshes)
    aux = jax.device_get(trainer.update(stale_batch, off_policy=False))
    want_params, want_loss, want_w = _reference_step(small_model, stale_batch, False)
    assert want_w == 1.0 and aux["policy/is_weight_mean"] == 1.0
    assert aux["loss/policy"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    _assert_params_close(_host(trainer.params), want_params)


# -- KL(π_θ ‖ π_ref) per row, for KL in the reward --------------------------------------------


def _kl_token(estimator, lp, ref):
    """Schulman (2020) with log r = log π_ref - log π_θ: k1 = -log r, k2 = (log r)²/2,
    k3 = (r - 1) - log r."""
    log_r = ref - lp
    return {"k1": -log_r, "k2": 0.5 * log_r * log_r, "k3": math.expm1(log_r) - log_r}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_sequence_kl_sums_the_estimator_over_the_loss_mask(small_model, meshes, batch,
                                                            estimator):
    # After one update π_θ ≠ π_ref (= the initial params): Σ_t over the *loss* mask of the
    # estimator per token, from each policy's logprobs. Row 6 (loss-masked) has KL 0.
    mdef, params = small_model
    trainer = _trainer(small_model, meshes, lr=0.5, beta=0.5, kl_penalty="reward",
                       kl_estimator=estimator)
    trainer.update(batch)
    got = np.asarray(jax.device_get(trainer.sequence_kl(batch)))
    lp = _plain_logps(mdef, _host(trainer.params), batch)
    ref = _plain_logps(mdef, params, batch)
    want = np.zeros(B)
    for i in range(B):
        for t in range(T):
            if batch.loss_mask_BxT[i, t]:
                want[i] += _kl_token(estimator, lp[i, t], ref[i, t])
    assert got.shape == (B,) and got[6] == 0.0
    assert np.abs(want).max() > 1e-3  # the update moved the policy measurably
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # whole-model forwards
