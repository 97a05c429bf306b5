"""Per-token log-probabilities and entropy (pure functions).

Temperature: the sampler draws token t from softmax(logits / τ) and reports log p_τ(t). The
trainer scores the same tokens under the same tempered distribution, so the importance ratio
π_θ/π_old compares like with like (as TRL and verl do). τ = 0 (greedy) is scored at τ = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tempered_log_softmax(logits_BxTxV: jax.Array, temperature: float) -> jax.Array:
    tau = temperature if temperature > 0 else 1.0
    return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32) / tau, axis=-1)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0
                   ) -> jax.Array:
    """log p_τ(tokens[b, t] | logits[b, t]) for every position."""
    logp_BxTxV = tempered_log_softmax(logits_BxTxV, temperature)
    return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]


def token_entropy(logits_BxTxV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of the tempered next-token distribution at every position."""
    logp = tempered_log_softmax(logits_BxTxV, temperature)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_logprobs_and_entropy(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log p_τ(token), H(p_τ)) at every position, from one log-softmax."""
    logp_BxTxV = tempered_log_softmax(logits_BxTxV, temperature)
    chosen = jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]
    return chosen, -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
