"""Temperature, top-k, top-p and greedy (sampler/sampling.py) on fixed logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import ConfigError, load_config
from sampler import sampling
from sampler.sampling import CDF_BLOCK, inverse_cdf, top_k_mask, top_p_mask, truncation_mask

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


def test_top_k_mask_k_1_k_3_ties_and_dtype():
    logits = jnp.array([[10.0, 30.0, 20.0, 0.0], [2.0, 1.0, 2.0, 0.0]])
    # k = 1: the largest only; row 1 ties at 2.0, and both tied tokens are kept.
    np.testing.assert_array_equal(top_k_mask(logits, 1), [[0, 1, 0, 0], [1, 0, 1, 0]])
    # k = 2 and 3 on row 0: the k-th largest *value* (20, then 10) is the cutoff.
    np.testing.assert_array_equal(top_k_mask(logits[:1], 2), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(top_k_mask(logits[:1], 3), [[1, 1, 1, 0]])
    # Boolean masks, whether top-k is on or off.
    assert top_k_mask(logits, 2).dtype == bool and top_k_mask(logits, 0).dtype == bool


def test_top_p_1_keeps_every_token():
    mask = top_p_mask(jnp.array([[0.0, -1.0, 5.0], [1.0, 1.0, -3.0]]), 1.0)
    assert mask.shape == (2, 3) and mask.dtype == bool and bool(mask.all())


def test_truncation_mask_top_k_1_and_per_row_renormalization():
    # top-k = 1 keeps the most likely token only, whatever top-p is.
    np.testing.assert_array_equal(truncation_mask(LOGITS_1xV, 1, 1.0)[0], [1, 0, 0, 0])
    # Two rows, top-k = 3 then top-p = 0.83, each row renormalized over its own top 3:
    #   row 0: p = [0.5, 0.3, 0.15, 0.05] -> [0.526, 0.316, 0.158], mass before [0, 0.526, 0.842]
    #          -> 2 tokens (as in test_top_p_applies_to_the_top_k_renormalized_distribution);
    #   row 1: p = [0.9, 0.05, 0.03, 0.02] -> [0.918, 0.051, 0.031], mass before [0, 0.918, ...]
    #          -> 1 token.
    logits = jnp.log(jnp.array([PROBS, [0.9, 0.05, 0.03, 0.02]], jnp.float32))
    np.testing.assert_array_equal(truncation_mask(logits, 3, 0.83), [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_top_k_1_draws_the_argmax_and_reports_its_mass():
    # τ = 1, top-k = 1: every draw is the argmax; Z = p(argmax); logprob = log p(argmax).
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(64, 16)), jnp.float32)
    tok, lp, kept = sample_tokens(logits, jax.random.key(1), temperature=1.0, top_k=1)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = logp.argmax(axis=-1)
    np.testing.assert_array_equal(np.asarray(tok), want)
    np.testing.assert_allclose(np.asarray(lp), logp[np.arange(64), want], atol=1e-6)
    np.testing.assert_allclose(np.asarray(kept), np.exp(logp[np.arange(64), want]), atol=1e-6)


def test_inverse_cdf_hand_worked():
    # p = [0.1, 0.2, 0.7]: CDF intervals [0, .1), [.1, .3), [.3, 1).
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.7]] * 6))
    u = jnp.array([0.0, 0.05, 0.15, 0.29, 0.31, 0.999])
    np.testing.assert_array_equal(np.asarray(inverse_cdf(logits, u)), [0, 0, 1, 1, 2, 2])
    # -inf logits have empty intervals: never drawn, at a boundary or at u = 0 or 1.
    logits = jnp.array([[-jnp.inf, 0.0, -jnp.inf, 0.0, -jnp.inf]] * 4)
    u = jnp.array([0.0, 0.5, 0.7, 1.0])
    np.testing.assert_array_equal(np.asarray(inverse_cdf(logits, u)), [1, 3, 3, 3])
    # u given to sample_tokens decides the draw (rng unused), truncation applied first:
    # top-k = 2 of [3, 2, 1, 0] keeps tokens 0 and 1, so u close to 1 draws token 1.
    tok, _, _ = sample_tokens(jnp.array([[3.0, 2.0, 1.0, 0.0]]), jax.random.key(0),
                              temperature=1.0, top_k=2, uniform_B=jnp.array([0.999]))
    assert int(tok[0]) == 1


def test_inverse_cdf_across_blocks_matches_searchsorted():
    # A vocabulary of several CDF blocks plus a ragged tail, mass on a few scattered tokens
    # (whole blocks empty): every draw is numpy's searchsorted on the cumulative sum.
    v = 3 * CDF_BLOCK + 5
    logits = np.full(v, -np.inf, np.float32)
    hot = [0, 300, 301, 700, v - 1]
    logits[hot] = [0.5, -1.0, 2.0, 0.0, 1.0]
    u = np.linspace(0.0, 0.9999, 401, dtype=np.float32)
    got = np.asarray(inverse_cdf(jnp.asarray(np.tile(logits, (u.size, 1))), jnp.asarray(u)))
    e = np.exp(logits - logits.max())
    want = np.searchsorted(np.cumsum(e), u * e.sum(), side="right")
    np.testing.assert_array_equal(got, want)
    assert set(got) == set(hot)
    # u = 1 (rounding's worst case): the last token with mass, not a padded column after it.
    assert int(inverse_cdf(jnp.asarray(logits[None, :-1]), jnp.array([1.0]))[0]) == 700


def test_bfloat16_logits_are_scored_in_float32():
    # A bf16 model's logits: log p_τ is computed in float32 from the bf16 values.
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(8, 64)) * 4.0, jnp.bfloat16)
    want = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32) / 0.7, axis=-1))
    tok, lp, kept = sample_tokens(logits, jax.random.key(2), temperature=0.7)
    assert lp.dtype == jnp.float32 and kept.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), want[np.arange(8), np.asarray(tok)], atol=1e-5)
    # Greedy reports Z = 1 (nothing truncated).
    _, _, kept = sample_tokens(logits, jax.random.key(2), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(kept), np.ones(8, np.float32))
