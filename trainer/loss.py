"""The GRPO-family loss as pure functions of arrays.

Per token t of completion i, with A_i the completion's advantage (Shao et al., 2024, eq. 3):

    log ρ_t = log π_θ(y_t) - log π_old(y_t)                       ("token" level, PPO/GRPO)
    log ρ_t = (1/|y_i|) Σ_s log π_θ(y_s)/π_old(y_s)  for every t  ("sequence" level, GSPO,
                                                                   Zheng et al., 2025)
    L_pg = -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A)                (DAPO clip-higher when
                                                                   ε_high > ε_low)
    if A < 0 and dual-clip c is set:  L_pg = min(L_pg, -c A)       (Ye et al., 2020)
    L = aggregate(L_pg + β KL(π_θ || π_ref) - entropy_coef · H(π_θ))

KL estimators (Schulman, 2020, "Approximating KL divergence"), with samples from π_θ and
log r = log π_ref - log π_θ:

    k1 = -log r                 (unbiased, high variance, can be negative)
    k2 = (log r)² / 2           (biased, low variance)
    k3 = (r - 1) - log r        (unbiased, low variance, >= 0; GRPO's choice)

Aggregation (`AGGREGATIONS`, verl's `loss_agg_mode` names) is a weighted sum Σ_bt w_bt ℓ_bt
with weights that depend only on the mask, so a loss split into microbatches and summed is
exactly the loss of the whole minibatch:

    token-mean               w = m / Σ m                           DAPO; TRL "dapo"/"bnpo"
    seq-mean-token-mean      w = m / (|y_b| · S)                   GRPO; TRL "grpo"
    seq-mean-token-sum       w = m / S
    seq-mean-token-sum-norm  w = m / (B · L)                       Dr.GRPO; TRL "dr_grpo"

with m the 0/1 mask, |y_b| = Σ_t m_bt, S the number of rows with any real token, B all rows,
and L a constant (the completion budget; Dr.GRPO's "constant normaliser").

Masked tokens never contribute, to the value or to the gradient: every per-token input is
zeroed where the mask is 0 *before* any exp, so padding holding garbage cannot leak NaNs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

KLFn = Callable[[jax.Array, jax.Array], jax.Array]


def kl_k1(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """k1 = log π_θ - log π_ref."""
    return logps_BxT - ref_logps_BxT


def kl_k2(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """k2 = (log π_θ - log π_ref)² / 2."""
    return 0.5 * jnp.square(logps_BxT - ref_logps_BxT)


def kl_k3(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """k3 = exp(d) - d - 1 with d = log π_ref - log π_θ; >= 0, unbiased for KL(π_θ || π_ref)."""
    d = ref_logps_BxT - logps_BxT
    return jnp.exp(d) - d - 1.0


# Keyed by `algorithm.kl_estimator`.
KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _mask_f32(mask_BxT: jax.Array) -> jax.Array:
    return mask_BxT.astype(jnp.float32)


def _token_mean_weights(m: jax.Array, norm_length: int | None) -> jax.Array:
    return m / jnp.maximum(jnp.sum(m), 1.0)


def _seq_rows(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    n_B = jnp.sum(m, axis=-1)
    s = jnp.maximum(jnp.sum((n_B > 0).astype(jnp.float32)), 1.0)
    return n_B, s


def _seq_mean_token_mean_weights(m: jax.Array, norm_length: int | None) -> jax.Array:
    n_B, s = _seq_rows(m)
    return m / (jnp.maximum(n_B, 1.0)[:, None] * s)


def _seq_mean_token_sum_weights(m: jax.Array, norm_length: int | None) -> jax.Array:
    _, s = _seq_rows(m)
    return m / s


def _seq_mean_token_sum_norm_weights(m: jax.Array, norm_length: int | None) -> jax.Array:
    length = m.shape[1] if norm_length is None else norm_length
    return m / float(m.shape[0] * length)


# Keyed by `algorithm.loss_aggregation`: mask -> weights (see the module docstring).
AGGREGATIONS: dict[str, Callable[[jax.Array, int | None], jax.Array]] = {
    "token-mean": _token_mean_weights,
    "seq-mean-token-mean": _seq_mean_token_mean_weights,
    "seq-mean-token-sum": _seq_mean_token_sum_weights,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm_weights,
}


def aggregation_weights(mask_BxT: jax.Array, mode: str, norm_length: int | None = None
                        ) -> jax.Array:
    """w_BxT such that the aggregated loss is Σ w·ℓ; zero wherever the mask is.

    `norm_length` is Dr.GRPO's constant L (only "seq-mean-token-sum-norm" uses it; None: T).
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown loss aggregation {mode!r} (known: {sorted(AGGREGATIONS)})"
                         ) from None
    return fn(_mask_f32(mask_BxT), norm_length)


def aggregate(per_token_BxT: jax.Array, mask_BxT: jax.Array, mode: str,
              norm_length: int | None = None) -> jax.Array:
    """Σ w·ℓ over the masked tokens with the mode's weights."""
    w = aggregation_weights(mask_BxT, mode, norm_length)
    return jnp.sum(jnp.where(mask_BxT.astype(bool), per_token_BxT, 0.0) * w)


def token_log_ratio(logps_BxT: jax.Array, old_logps_BxT: jax.Array, mask_BxT: jax.Array
                    ) -> jax.Array:
    """log ρ_t = log π_θ - log π_old per token (0 on padding)."""
    return jnp.where(mask_BxT.astype(bool), logps_BxT - old_logps_BxT, 0.0)


def sequence_log_ratio(logps_BxT: jax.Array, old_logps_BxT: jax.Array, mask_BxT: jax.Array
                       ) -> jax.Array:
    """GSPO: log s_i = mean over the real tokens of log ρ_t, broadcast to every token."""
    m = _mask_f32(mask_BxT)
    lr = token_log_ratio(logps_BxT, old_logps_BxT, mask_BxT)
    seq_B = jnp.sum(lr, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.broadcast_to(seq_B[:, None], lr.shape) * m


# Keyed by `algorithm.importance_sampling_level`.
LOG_RATIOS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


def clipped_surrogate(ratio_BxT: jax.Array, adv_BxT: jax.Array, *, clip_low: float,
                      clip_high: float, dual_clip_c: float | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token L_pg = -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), dual-clipped at -cA for A < 0.

    Returns (L_pg, indicators) with 0/1 float indicators of where each clip binds:
    "low" (ρ < 1-ε_low, A < 0), "high" (ρ > 1+ε_high, A > 0), "dual" (dual clip, A < 0).
    """
    unclipped = -ratio_BxT * adv_BxT
    clipped = -jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high) * adv_BxT
    pg = jnp.maximum(unclipped, clipped)
    neg = adv_BxT < 0
    ind = {
        "low": ((ratio_BxT < 1.0 - clip_low) & neg),
        "high": ((ratio_BxT > 1.0 + clip_high) & (adv_BxT > 0)),
    }
    if dual_clip_c is not None:
        cap = -dual_clip_c * adv_BxT
        ind["dual"] = neg & (pg > cap)
        pg = jnp.where(neg, jnp.minimum(pg, cap), pg)
    return pg, {k: v.astype(jnp.float32) for k, v in ind.items()}


def grpo_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array | None,
    adv_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    dual_clip_c: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token-mean",
    norm_length: int | None = None,
    importance_sampling_level: str = "token",
    entropy_BxT: jax.Array | None = None,
    entropy_coef: float = 0.0,
    weights_BxT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of the module docstring. Returns (loss, aux); aux is stop-gradient diagnostics.

    `weights_BxT` overrides the aggregation weights (the trainer passes a microbatch's slice of
    the whole minibatch's weights, so summed microbatch losses equal the minibatch loss).
    aux keys: "loss/policy", "loss/kl", "loss/entropy" (aggregated like the loss);
    "kl/mean", "policy/entropy", "policy/approx_kl", "clip/{low,high,dual}_frac",
    "loss/clip_frac", "ratio/mean" (token means over the mask); "ratio/min", "ratio/max".
    """
    on = mask_BxT.astype(bool)
    m = _mask_f32(mask_BxT)
    n = jnp.maximum(jnp.sum(m), 1.0)
    w = aggregation_weights(mask_BxT, aggregation, norm_length) if weights_BxT is None \
        else weights_BxT

    def agg(x):
        return jnp.sum(jnp.where(on, x, 0.0) * w)

    def token_mean(x):
        return jnp.sum(jnp.where(on, x, 0.0)) / n

    try:
        log_ratio_fn = LOG_RATIOS[importance_sampling_level]
    except KeyError:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r} "
                         f"(known: {sorted(LOG_RATIOS)})") from None
    ratio = jnp.exp(log_ratio_fn(logps_BxT, old_logps_BxT, mask_BxT))  # 1 on padding
    # Per-sequence advantages, or per-token ones (the async schedule's IS-weighted A_i w_t).
    adv = jnp.broadcast_to(adv_B[:, None] if adv_B.ndim == 1 else adv_B, ratio.shape)
    pg, ind = clipped_surrogate(
        ratio, adv, clip_low=epsilon if epsilon_low is None else epsilon_low,
        clip_high=epsilon if epsilon_high is None else epsilon_high, dual_clip_c=dual_clip_c)
    loss = agg(pg)
    sg = jax.lax.stop_gradient
    aux: dict[str, jax.Array] = {"loss/policy": sg(loss)}

    if ref_logps_BxT is not None and beta > 0:
        try:
            kl_fn = KL_ESTIMATORS[kl_estimator]
        except KeyError:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r} (known: "
                             f"{sorted(KL_ESTIMATORS)})") from None
        safe_ref = jnp.where(on, ref_logps_BxT, logps_BxT)  # d = 0 on padding
        kl = kl_fn(logps_BxT, safe_ref)
        kl_term = beta * agg(kl)
        loss = loss + kl_term
        aux["loss/kl"] = sg(kl_term)
        aux["kl/mean"] = sg(token_mean(kl))

    if entropy_BxT is not None:
        ent_agg = agg(entropy_BxT)
        if entropy_coef > 0:
            loss = loss - entropy_coef * ent_agg
        aux["loss/entropy"] = sg(ent_agg)
        aux["policy/entropy"] = sg(token_mean(entropy_BxT))

    # Diagnostics (no gradient). approx KL(π_old || π_θ) by k3 on the token ratio (cleanrl).
    tok_lr = sg(token_log_ratio(logps_BxT, old_logps_BxT, mask_BxT))
    aux["policy/approx_kl"] = token_mean(jnp.expm1(tok_lr) - tok_lr)
    r = sg(ratio)
    aux["ratio/mean"] = token_mean(r)
    aux["ratio/min"] = jnp.min(jnp.where(on, r, jnp.inf))
    aux["ratio/max"] = jnp.max(jnp.where(on, r, -jnp.inf))
    for k, v in ind.items():
        aux[f"clip/{k}_frac"] = sg(token_mean(v))
    aux["loss/clip_frac"] = sg(token_mean(jnp.maximum(ind["low"], ind["high"])))
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
