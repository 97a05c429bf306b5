"""The GRPO loss as pure functions of arrays.

Per token t of completion i (Shao et al., 2024, eq. 3, with DeepSeek's k3 KL estimator):

    ρ = exp(log π_θ - log π_old)
    L_pg = -min(ρ A, clip(ρ, 1-ε, 1+ε) A)
    KL_k3 = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1     (Schulman, 2020)
    L = aggregate(L_pg + β KL_k3)

Aggregation over the masked tokens:
- "token-mean": sum over all tokens / number of tokens (DAPO's token-level mean);
- "seq-mean-token-mean": mean over tokens within a completion, then over completions (GRPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_k3(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """k3 = exp(d) - d - 1 with d = log π_ref - log π_θ; >= 0, unbiased for KL(π_θ || π_ref)."""
    d = ref_logps_BxT - logps_BxT
    return jnp.exp(d) - d - 1.0


def aggregate(per_token_BxT: jax.Array, mask_BxT: jax.Array, mode: str) -> jax.Array:
    m = mask_BxT.astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(per_token_BxT * m) / jnp.maximum(jnp.sum(m), 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = jnp.sum(per_token_BxT * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
        has_tokens = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def grpo_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array | None,
    adv_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float,
    beta: float,
    aggregation: str = "token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, aux); aux holds stop-gradient diagnostics."""
    ratio = jnp.exp(logps_BxT - old_logps_BxT)
    adv = adv_B[:, None] if adv_B.ndim == 1 else adv_B  # per-sequence or per-token
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    pg_BxT = -jnp.minimum(unclipped, clipped)
    per_token = pg_BxT
    m = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    aux: dict[str, jax.Array] = {}
    if ref_logps_BxT is not None and beta > 0:
        kl_BxT = kl_k3(logps_BxT, ref_logps_BxT)
        per_token = per_token + beta * kl_BxT
        aux["kl/mean"] = jax.lax.stop_gradient(jnp.sum(kl_BxT * m) / n)
    loss = aggregate(per_token, mask_BxT, aggregation)
    aux["loss/policy"] = jax.lax.stop_gradient(aggregate(pg_BxT, mask_BxT, aggregation))
    clipped_frac = jnp.sum((unclipped != jnp.minimum(unclipped, clipped)) * m) / n
    aux["loss/clip_frac"] = jax.lax.stop_gradient(clipped_frac)
    return loss, aux


def truncated_is_weights(logps_BxT: jax.Array, behaviour_logps_BxT: jax.Array, cap: float
                         ) -> jax.Array:
    """Truncated importance weights w = min(π_θ / μ, C) for off-policy (stale) batches.

    μ is the behaviour policy that sampled the tokens (the sampler's logprobs), π_θ the current
    policy (detached). Multiplying the per-token policy-gradient term by w corrects for the
    batch having been sampled by older weights, with the truncation at C bounding its variance
    (truncated IS as in IMPALA/V-trace and the asynchronous RLHF papers, e.g. Noukhovitch et
    al., 2024; the "TIS" correction of Yao et al., 2025). w = 1 when π_θ = μ.
    """
    ratio = jnp.exp(jax.lax.stop_gradient(logps_BxT) - behaviour_logps_BxT)
    return jnp.minimum(ratio, cap)
