"""Choosing the next token (pure).

The chosen token's logprob is taken under the same tempered distribution it was drawn from,
log softmax(logits / τ), which is what the trainer scores (see trainer/logprobs.py). τ = 0 is
greedy decoding, and its logprob is reported at τ = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits_BxV: jax.Array, rng: jax.Array, temperature: float
                  ) -> tuple[jax.Array, jax.Array]:
    """Returns (token_B, logprob_B)."""
    if temperature == 0:
        logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
        tok_B = jnp.argmax(logp_BxV, axis=-1)
    else:
        logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / temperature, axis=-1)
        tok_B = jax.random.categorical(rng, logp_BxV, axis=-1)
    lp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B.astype(jnp.int32), lp_B
