"""Temperature, top-k, top-p and greedy (sampler/sampling.py) on fixed logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import ConfigError, load_config
from sampler import sampling
from sampler.sampling import top_k_mask, top_p_mask, truncation_mask

# Jitted once per knob setting: op-by-op eager dispatch would compile every primitive.
sample_tokens = jax.jit(sampling.sample_tokens, static_argnames=("temperature", "top_k", "top_p"))

# p = [0.5, 0.3, 0.15, 0.05]: softmax(log p) = p, so masks can be worked by hand.
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS_1xV = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def test_top_k_mask_hand_worked():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    np.testing.assert_array_equal(top_k_mask(logits, 2), [[0, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(top_k_mask(logits, 0), np.ones((2, 4), bool))  # 0 = off
    np.testing.assert_array_equal(top_k_mask(logits, 4), np.ones((2, 4), bool))


@pytest.mark.parametrize(
    ("p", "kept"),
    # Mass before each sorted token: [0, 0.5, 0.8, 0.95]; token kept while that is < p.
    [(0.4, [1, 0, 0, 0]), (0.7, [1, 1, 0, 0]), (0.9, [1, 1, 1, 0]), (0.99, [1, 1, 1, 1])],
)
def test_top_p_mask_hand_worked(p, kept):
    np.testing.assert_array_equal(top_p_mask(LOGITS_1xV, p)[0], kept)
    # Unsorted input: the same set, in place.
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_array_equal(top_p_mask(LOGITS_1xV[:, perm], p)[0], np.array(kept)[perm])


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    # top-p alone, p = 0.83: mass before = [0, 0.5, 0.8, 0.95] -> keeps 3 tokens.
    np.testing.assert_array_equal(truncation_mask(LOGITS_1xV, 0, 0.83)[0], [1, 1, 1, 0])
    # top-k = 3 first renormalizes to [0.5, 0.3, 0.15] / 0.95 = [0.526, 0.316, 0.158]:
    # mass before = [0, 0.526, 0.842] -> the third token falls out at p = 0.83.
    np.testing.assert_array_equal(truncation_mask(LOGITS_1xV, 3, 0.83)[0], [1, 1, 0, 0])


def test_truncated_sampling_never_emits_an_excluded_token_and_matches_q():
    # 20,000 draws (one row each) from τ = 1, top-k = 3: token 3 must never appear, and the
    # frequencies must follow q = p / 0.95 on the kept tokens.
    n = 20_000
    logits = jnp.tile(LOGITS_1xV, (n, 1))
    tok, lp, kept = sample_tokens(logits, jax.random.key(0), temperature=1.0, top_k=3)
    counts = np.bincount(np.asarray(tok), minlength=4) / n
    assert counts[3] == 0
    q = PROBS[:3] / PROBS[:3].sum()
    np.testing.assert_allclose(counts[:3], q, atol=0.015)  # ~4.5 binomial std devs
    # The reported logprob is log p_τ (untruncated), and Z = 0.95 is reported beside it.
    np.testing.assert_allclose(np.asarray(lp), np.log(PROBS)[np.asarray(tok)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(kept), 0.95, atol=1e-6)


def test_top_p_sampling_never_emits_an_excluded_token():
    # 1,000 rows of random logits, V = 50, p = 0.6, τ = 0.7: every draw must lie inside its row's
    # nucleus computed independently in NumPy.
    n, v, tau, p = 1_000, 50, 0.7, 0.6
    logits = np.random.default_rng(1).normal(size=(n, v)).astype(np.float32) * 2.0
    tok, _, _ = sample_tokens(jnp.asarray(logits), jax.random.key(2), temperature=tau, top_p=p)
    e = np.exp(logits.astype(np.float64) / tau)
    probs = e / e.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    n_keep = ((np.cumsum(sorted_p, axis=-1) - sorted_p) < p).sum(axis=-1)
    for row, t in enumerate(np.asarray(tok)):
        assert t in order[row, : n_keep[row]]
    assert len(np.unique(np.asarray(tok))) > 5  # and it does sample, not just argmax


def test_temperature_logprob_is_the_tempered_log_softmax():
    # τ = 2: log p_τ(v) = logits_v / 2 - logsumexp(logits / 2), for whatever token is drawn.
    logits = jnp.array([[2.0, 0.0, -2.0], [1.0, 1.0, 1.0]])
    tok, lp, kept = sample_tokens(logits, jax.random.key(3), temperature=2.0)
    half = np.asarray(logits) / 2.0
    want = half - np.log(np.exp(half).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp), want[[0, 1], np.asarray(tok)], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(kept), [1.0, 1.0])


def test_greedy_takes_the_argmax_and_reports_the_tau_1_logprob():
    logits = jnp.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tok, lp, _ = sample_tokens(logits, jax.random.key(0), temperature=0.0, top_k=1, top_p=0.1)
    np.testing.assert_array_equal(np.asarray(tok), [1, 0])
    # log softmax([0, 3, 1])[1] = 3 - log(1 + e^3 + e)
    np.testing.assert_allclose(
        np.asarray(lp), [3 - math.log(1 + math.e**3 + math.e), 5 - math.log(math.e**5 + 2)],
        atol=1e-6)


def test_sampling_is_deterministic_for_a_fixed_key():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(64, 32)), jnp.float32)
    a = sample_tokens(logits, jax.random.key(9), temperature=1.0, top_k=10, top_p=0.9)
    b = sample_tokens(logits, jax.random.key(9), temperature=1.0, top_k=10, top_p=0.9)
    c = sample_tokens(logits, jax.random.key(10), temperature=1.0, top_k=10, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert (np.asarray(a[0]) != np.asarray(c[0])).any()


def test_sampling_config_fields_validate():
    cfg = load_config(overrides=["sampling.top_k=5", "sampling.top_p=0.9",
                                 "sampling.stop_tokens=[3, 4]", "sampling.backend=vllm"])
    assert (cfg.sampling.top_k, cfg.sampling.top_p, cfg.sampling.stop_tokens) == (5, 0.9, [3, 4])
    with pytest.raises(ConfigError, match=r"sampling.top_p=0"):
        load_config(overrides=["sampling.top_p=0"])
    with pytest.raises(ConfigError, match=r"sampling.top_k=-1"):
        load_config(overrides=["sampling.top_k=-1"])
    with pytest.raises(ConfigError, match=r"sampling.stop_tokens=\[-1\]: token ids must be >= 0"):
        load_config(overrides=["sampling.stop_tokens=[-1]"])
    with pytest.raises(ConfigError, match=r"sampling.backend='tgi'"):
        load_config(overrides=["sampling.backend=tgi"])
