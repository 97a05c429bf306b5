"""Choosing the next token (pure): temperature, top-k, top-p (nucleus), greedy.

Order, as in HF `generate` and vLLM: scale by the temperature τ, keep the top-k logits, then
keep the smallest set of those whose probability (renormalized over the top-k) reaches top-p,
and draw from what is left:

    p_τ(v)  = softmax(logits / τ)(v)                   the tempered distribution
    K       = topp(topk(p_τ, k), p)                    the kept tokens
    q(v)    = p_τ(v) / Z   for v in K, 0 elsewhere     Z = Σ_{v∈K} p_τ(v), the kept mass

Which logprob is reported. The trainer scores a completion with log p_τ (log softmax of the
logits over τ, no truncation; trainer/logprobs.py), and so does this module: the reported
logprob is log p_τ(token), not log q(token) = log p_τ(token) - log Z. The choice matters for the
importance ratio r = π_θ / π_old:

- With log p_τ, an on-policy ratio is exactly 1 (π_θ = π_old, both untruncated), so PPO/GRPO
  clipping at 1 ± ε behaves as designed and `sampler/logp_abs_diff` (trainer vs sampler
  logprobs) stays at float rounding: it detects a stale or wrongly loaded sampler.
- The tokens were really drawn from q, so the exact off-policy correction is π_θ / q =
  Z · π_θ / p_τ. Reporting log p_τ drops the factor Z ≤ 1, which does not depend on θ: each
  token's gradient is scaled by its Z (tokens at positions where truncation removed much mass
  are slightly over-weighted relative to the exact correction). With top_k = 0 and top_p = 1,
  Z = 1 and the two agree exactly. `kept_mass` is returned so the bias can be watched: a mean
  near 1 means the truncation hardly changes the distribution.
- Reporting log q instead would make an on-policy ratio Z < 1 before any update and clip
  tokens whose Z < 1 - ε, a larger and θ-independent distortion; vLLM's
  `logprobs_mode="processed_logprobs"` reports log q (see sampler/vllm_backend.py).

Greedy (τ = 0) takes the argmax; its logprob is reported at τ = 1, as the trainer scores it.
Ties in top-k / top-p: every token tied with the last kept one is kept too (so a row may keep
more than k tokens when logits tie exactly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def top_k_mask(logits_BxV: jax.Array, k: int) -> jax.Array:
    """True at the k largest logits of each row (and at exact ties with the k-th); k=0: all."""
    v = logits_BxV.shape[-1]
    if k <= 0 or k >= v:
        return jnp.ones(logits_BxV.shape, bool)
    kth_B = jax.lax.top_k(logits_BxV, k)[0][:, -1]
    return logits_BxV >= kth_B[:, None]


def top_p_mask(logits_BxV: jax.Array, p: float) -> jax.Array:
    """True at the smallest set of most likely tokens whose softmax mass reaches p; p=1: all.

    With the probabilities sorted high to low, π_(1) ≥ π_(2) ≥ ..., token (i) is kept when the
    mass before it, Σ_{j<i} π_(j), is < p: the most likely token is always kept, and the set
    stops at the first token that brings the total to >= p. Masked (-inf) logits have π = 0.
    """
    if p >= 1.0:
        return jnp.ones(logits_BxV.shape, bool)
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]  # high to low
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B = jnp.sum(before_BxV < p, axis=-1)  # >= 1: before[0] = 0 < p
    cutoff_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    return logits_BxV >= cutoff_B[:, None]


def truncation_mask(scaled_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """The kept set K: top-k of the (tempered) logits, then top-p renormalized over those.

    With top-k on, top-p works on the k values `lax.top_k` already returns sorted, instead of
    sorting the whole vocabulary every decode step (3x faster at V = 1024, k = 50 on CPU).
    """
    v = scaled_BxV.shape[-1]
    if top_k <= 0 or top_k >= v:
        return top_p_mask(scaled_BxV, top_p)
    top_BxK = jax.lax.top_k(scaled_BxV, top_k)[0]  # high to low
    n_keep_B = jnp.full(top_BxK.shape[:1], top_k)
    if top_p < 1.0:
        # Same rule as top_p_mask, on the top-k renormalized: keep while mass before < p.
        probs_BxK = jax.nn.softmax(top_BxK, axis=-1)
        before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        n_keep_B = jnp.sum(before_BxK < top_p, axis=-1)
    cutoff_B = jnp.take_along_axis(top_BxK, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    return scaled_BxV >= cutoff_B[:, None]


def sample_tokens(
    logits_BxV: jax.Array,
    rng: jax.Array,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    gumbel_BxV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row. Returns (token_B, logprob_B, kept_mass_B).

    logprob_B = log p_τ(token) (untruncated; see the module docstring), kept_mass_B = Z, the
    tempered probability mass that top-k / top-p kept (1 when both are off, and for greedy).
    The knobs are Python values: they are fixed per compiled program.

    The draw is the Gumbel-max trick, argmax(logits + g) with g = `jax.random.gumbel(rng,
    [B, V])`, exactly what `jax.random.categorical(rng, logits)` computes; `gumbel_BxV` passes
    g drawn beforehand (then `rng` is unused), which gives the same token for the same key.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
        tok_B = jnp.argmax(logits_BxV, axis=-1)
        kept_B = jnp.ones(tok_B.shape, jnp.float32)
    else:
        scaled_BxV = logits_BxV / temperature
        logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
        if top_k > 0 or top_p < 1.0:
            keep_BxV = truncation_mask(scaled_BxV, top_k, top_p)
            tok_B = _categorical(rng, jnp.where(keep_BxV, scaled_BxV, NEG_INF), gumbel_BxV)
            kept_B = jnp.sum(jnp.where(keep_BxV, jnp.exp(logp_BxV), 0.0), axis=-1)
        else:
            tok_B = _categorical(rng, scaled_BxV, gumbel_BxV)
            kept_B = jnp.ones(tok_B.shape, jnp.float32)
    lp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B.astype(jnp.int32), lp_B, kept_B


def _categorical(rng: jax.Array, logits_BxV: jax.Array, gumbel_BxV: jax.Array | None
                 ) -> jax.Array:
    if gumbel_BxV is None:
        return jax.random.categorical(rng, logits_BxV, axis=-1)
    return jnp.argmax(gumbel_BxV + logits_BxV, axis=-1)  # categorical's own formula
