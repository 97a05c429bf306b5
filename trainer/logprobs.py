"""Per-token log-probabilities and entropy (pure functions).

Two levels: from logits (`token_logprobs_and_entropy` and its parts), and from the policy
itself, log π(completion token | prompt, earlier completion tokens) for rows of (left-padded
prompt, completion) (`sequence_logprobs_and_entropy`), by the model's forward in three pieces
(`embed_rows`, `block_rows` per layer, `head_rows`) that the layered update
(trainer/layered.py) also runs as separate programs.

Temperature: the sampler draws token t from softmax(logits / τ) and reports log p_τ(t). The
trainer scores the same tokens under the same tempered distribution, so the importance ratio
π_θ/π_old compares like with like (as TRL and verl do). τ = 0 (greedy) is scored at τ = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer.model import (
    ModelDef,
    Params,
    apply_block,
    cache_shapes,
    causal_mask,
    embed_tokens,
    group_firsts,
    group_kv_to_rows,
    head_logits,
    positions_from_mask,
    to_rows,
    top_params,
)


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


# -- per row, by the model's forward --------------------------------------------------------

def sequence_logprobs_and_entropy(mdef: ModelDef, params: Params, prompt_BxP, prompt_mask_BxP,
                                  completion_BxT, completion_mask_BxT, temperature: float,
                                  group: int = 1) -> tuple[jax.Array, jax.Array]:
    """(log π(completion token | prefix), entropy of π there) per completion position.

    The logits at column j predict the token at column j + 1, so only the T columns P - 1 ..
    P + T - 2 go through the LM head.

    group > 1: rows come in consecutive groups of `group` that share one prompt (GRPO's G
    completions of a prompt). Each prompt then runs through the model once, as a prefill into a
    KV cache, and its keys and values are broadcast to the group's completions, which run as one
    chunk at cache columns [P, P + T). Every logit is the one the per-row forward computes (up
    to float rounding); the prompt's share of the FLOPs is divided by G, and the backward sums
    each completion's gradient into the shared prompt activations, as the per-row forward's
    identical copies would.

    The forward is the three pieces below (`embed_rows`, `block_rows` per layer, `head_rows`),
    which the layered update (trainer/layered.py) also runs as separate programs.
    """
    top = top_params(params)
    h = embed_rows(mdef, top, prompt_BxP, completion_BxT, group)
    for i in range(mdef.spec.num_layers):
        h = block_rows(mdef, mdef.spec.is_sliding(i), params["layers"][i], h, prompt_mask_BxP,
                       completion_mask_BxT, group)
    return head_rows(mdef, top, h, completion_BxT, temperature, group)


# Hidden states between the pieces: (x_BxLxD,) over prompt + completion columns for group 1;
# (x_NxPxD, x_BxTxD) for group G > 1: each group's prompt once, then every row's completion.
Hidden = tuple[jax.Array, ...]


def embed_rows(mdef: ModelDef, top: Params, prompt_BxP, completion_BxT, group: int) -> Hidden:
    """The token embeddings of the rows (for group > 1: each group's prompt once)."""
    spec, embed = mdef.spec, top["embed"]
    if group == 1:
        return (embed_tokens(spec, embed, jnp.concatenate([prompt_BxP, completion_BxT], 1)),)
    return (embed_tokens(spec, embed, group_firsts(prompt_BxP, group)),
            embed_tokens(spec, embed, completion_BxT))


def block_rows(mdef: ModelDef, sliding: bool, params_l: Params, h: Hidden, prompt_mask_BxP,
               completion_mask_BxT, group: int) -> Hidden:
    """One block on the hidden states: for group > 1 the prompts first, into a KV cache that
    each row's completion then attends to at cache columns [P, P + T)."""
    spec = mdef.spec
    p, t = prompt_mask_BxP.shape[1], completion_mask_BxT.shape[1]
    mask_BxL = jnp.concatenate([prompt_mask_BxP, completion_mask_BxT], axis=1).astype(bool)
    if group == 1:
        x, _ = apply_block(spec, sliding, params_l, h[0], positions_from_mask(mask_BxL),
                           causal_mask(mask_BxL, 0, p + t))
        return (x,)
    x_NxPxD, x_BxTxD = h
    pmask_NxP = group_firsts(prompt_mask_BxP, group).astype(bool)
    empty = tuple(jnp.zeros(shape, x_NxPxD.dtype)
                  for shape in cache_shapes(spec, x_NxPxD.shape[0], p))
    x_NxPxD, kv = apply_block(spec, sliding, params_l, x_NxPxD, positions_from_mask(pmask_NxP),
                              causal_mask(pmask_NxP, 0, p), empty, 0)
    x_BxTxD, _ = apply_block(spec, sliding, params_l, x_BxTxD,
                             positions_from_mask(mask_BxL)[:, p:], causal_mask(mask_BxL, p, t),
                             group_kv_to_rows(spec, kv, group, t), p)
    return x_NxPxD, x_BxTxD


def head_rows(mdef: ModelDef, top: Params, h: Hidden, completion_BxT, temperature: float,
              group: int) -> tuple[jax.Array, jax.Array]:
    """(logprob, entropy) of every completion token from the last block's hidden states."""
    spec, t = mdef.spec, completion_BxT.shape[1]
    if group == 1:
        x = h[0]
        p = x.shape[1] - t
        logits_BxTxV = head_logits(spec, top, x[:, p - 1:p + t - 1])
    else:
        x_NxPxD, x_BxTxD = h
        last_Bx1xV = to_rows(head_logits(spec, top, x_NxPxD[:, -1:]), group)
        logits_BxTxV = jnp.concatenate([last_Bx1xV, head_logits(spec, top, x_BxTxD[:, :t - 1])],
                                       axis=1)
    return token_logprobs_and_entropy(logits_BxTxV, completion_BxT, temperature)


def sequence_logprobs(mdef: ModelDef, params: Params, prompt_BxP, prompt_mask_BxP,
                      completion_BxT, completion_mask_BxT, temperature: float) -> jax.Array:
    """log π(completion token | prefix) for each completion position, by one full forward."""
    return sequence_logprobs_and_entropy(mdef, params, prompt_BxP, prompt_mask_BxP,
                                         completion_BxT, completion_mask_BxT, temperature)[0]
