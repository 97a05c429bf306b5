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
    uniform_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row. Returns (token_B, logprob_B, kept_mass_B).

    logprob_B = log p_τ(token) (untruncated; see the module docstring), kept_mass_B = Z, the
    tempered probability mass that top-k / top-p kept (1 when both are off, and for greedy).
    The knobs are Python values: they are fixed per compiled program.

    The draw inverts the kept distribution's CDF at one uniform u per row (`inverse_cdf`):
    `uniform_B` passes u drawn beforehand (then `rng` is unused), else u =
    `jax.random.uniform(rng, [B])`. One random number per row, where the Gumbel-max trick
    needs V: at a 152k vocabulary that is most of a sampling step's time on CPU.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
        tok_B = jnp.argmax(logits_BxV, axis=-1)
        kept_B = jnp.ones(tok_B.shape, jnp.float32)
    else:
        if uniform_B is None:
            uniform_B = jax.random.uniform(rng, logits_BxV.shape[:1], jnp.float32)
        scaled_BxV = logits_BxV / temperature
        logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
        if top_k > 0 or top_p < 1.0:
            keep_BxV = truncation_mask(scaled_BxV, top_k, top_p)
            tok_B = inverse_cdf(jnp.where(keep_BxV, scaled_BxV, NEG_INF), uniform_B)
            kept_B = jnp.sum(jnp.where(keep_BxV, jnp.exp(logp_BxV), 0.0), axis=-1)
        else:
            tok_B = inverse_cdf(scaled_BxV, uniform_B)
            kept_B = jnp.ones(tok_B.shape, jnp.float32)
    lp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B.astype(jnp.int32), lp_B, kept_B


# Tokens per block of the two-level CDF: a row's block sums are scanned, then one block.
CDF_BLOCK = 256


def inverse_cdf(logits_BxV: jax.Array, uniform_B: jax.Array) -> jax.Array:
    """The token whose CDF interval holds u: the first v with Σ_{j<=v} e_j > u · Σ_j e_j, where
    e = exp(logits - max). A -inf logit has an empty interval and is never drawn.

    Two levels, so no scan runs over the whole vocabulary: the cumulative sums of blocks of
    CDF_BLOCK tokens pick the block, a cumulative sum inside it picks the token. Rounding can
    put the target past the last non-empty interval; the draw then takes the last token with
    mass (of the last block with mass), never an empty one.
    """
    b, v = logits_BxV.shape
    n = -(-v // CDF_BLOCK)
    e_BxV = jnp.exp(logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True))
    e_BxNxC = jnp.pad(e_BxV, ((0, 0), (0, n * CDF_BLOCK - v))).reshape(b, n, CDF_BLOCK)
    block_BxN = jnp.sum(e_BxNxC, axis=-1)
    cum_BxN = jnp.cumsum(block_BxN, axis=-1)
    target_B = uniform_B * cum_BxN[:, -1]
    blk_B = jnp.minimum(jnp.sum(cum_BxN <= target_B[:, None], axis=-1),
                        _last_positive(block_BxN))
    before_B = jnp.where(blk_B > 0, jnp.take_along_axis(
        cum_BxN, jnp.maximum(blk_B - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    e_BxC = jnp.take_along_axis(e_BxNxC, blk_B[:, None, None], axis=1)[:, 0]
    cum_BxC = before_B[:, None] + jnp.cumsum(e_BxC, axis=-1)
    i_B = jnp.minimum(jnp.sum(cum_BxC <= target_B[:, None], axis=-1), _last_positive(e_BxC))
    return blk_B * CDF_BLOCK + i_B


def _last_positive(x_BxN: jax.Array) -> jax.Array:
    """Per row, the index of the last entry > 0 (0 if none)."""
    n = x_BxN.shape[-1]
    return n - 1 - jnp.argmax(x_BxN[:, ::-1] > 0, axis=-1)
