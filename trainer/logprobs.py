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

import dataclasses
import functools

import jax
import jax.numpy as jnp

from trainer.model import (
    CausalMask,
    ModelDef,
    ModelSpec,
    Params,
    apply_block,
    cache_shapes,
    embed_tokens,
    group_firsts,
    group_kv_to_rows,
    head_logits,
    linear,
    lora_dropout_key,
    positions_from_mask,
    rms_norm,
    rows_2d,
    softcap,
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
                                  group: int = 1, *, chunk: int | None = None,
                                  remat: str = "none", attention_chunk: int | None = None,
                                  entropy_grad: bool = True, dropout_key: jax.Array | None = None
                                  ) -> tuple[jax.Array, jax.Array]:
    """(log π(completion token | prefix), entropy of π there) per completion position.

    The logits at column j predict the token at column j + 1, so only the T columns P - 1 ..
    P + T - 2 go through the LM head, `chunk` positions of every row at a time when chunk is
    set (`chunked_head`). remat: what each block keeps for a backward pass (`rematerialized`).
    attention_chunk: each block's attention runs this many queries at a time (`Attention`).
    dropout_key: LoRA dropout in this forward (the update's policy forward); layer i runs with
    the key folded with i, as `Decoder` does.

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
    blocks = with_attention_chunk(mdef, attention_chunk)
    for i in range(mdef.spec.num_layers):
        sliding, key = mdef.spec.is_sliding(i), lora_dropout_key(dropout_key, i)

        def block(p, x, sliding=sliding, key=key):
            return block_rows(blocks, sliding, p, x, prompt_mask_BxP, completion_mask_BxT,
                              group, key)

        h = rematerialized(block, remat)(params["layers"][i], h)
    return head_rows(mdef, top, h, completion_BxT, temperature, group, chunk, entropy_grad)


def with_attention_chunk(mdef: ModelDef, chunk: int | None) -> ModelDef:
    """mdef whose blocks run attention `chunk` queries at a time (None: all at once)."""
    if chunk == mdef.spec.attn_query_chunk:
        return mdef
    return dataclasses.replace(mdef, spec=dataclasses.replace(mdef.spec, attn_query_chunk=chunk))


def rematerialized(fn, remat: str):
    """fn under an activation checkpointing policy, for its backward pass:

    "none": fn itself (the backward keeps every residual its ops save); "block": only fn's
    inputs are kept and fn runs again in the backward; "matmuls": the outputs of matmuls
    without batch dimensions (the projections) are kept and the rest (attention products,
    norms, activations) recomputed. The values are fn's either way: recomputation repeats the
    same operations.

    The layered update (trainer/layered.py) keeps exactly these residuals between a block's
    forward and backward programs. Inside one program the compiler schedules the
    recomputation: XLA on GPU and TPU runs it when the backward reaches the block, while
    XLA:CPU's scheduler runs it next to the forward, so on CPU only the layered update saves
    the memory.
    """
    if remat == "none":
        return fn
    if remat == "block":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if remat == "matmuls":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown activation checkpointing policy {remat!r} "
                     "(valid: none, block, matmuls)")


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
               completion_mask_BxT, group: int, dropout_key: jax.Array | None = None
               ) -> Hidden:
    """One block on the hidden states: for group > 1 the prompts first, into a KV cache that
    each row's completion then attends to at cache columns [P, P + T). dropout_key: the
    block's LoRA dropout key (for group > 1 folded with 0 for the prompts, 1 for the rest)."""
    spec = mdef.spec
    p, t = prompt_mask_BxP.shape[1], completion_mask_BxT.shape[1]
    mask_BxL = jnp.concatenate([prompt_mask_BxP, completion_mask_BxT], axis=1).astype(bool)
    if group == 1:
        x, _ = apply_block(spec, sliding, params_l, h[0], positions_from_mask(mask_BxL),
                           CausalMask(mask_BxL, 0, p + t), dropout_key=dropout_key)
        return (x,)
    x_NxPxD, x_BxTxD = h
    pmask_NxP = group_firsts(prompt_mask_BxP, group).astype(bool)
    empty = tuple(jnp.zeros(shape, x_NxPxD.dtype)
                  for shape in cache_shapes(spec, x_NxPxD.shape[0], p))
    x_NxPxD, kv = apply_block(spec, sliding, params_l, x_NxPxD, positions_from_mask(pmask_NxP),
                              CausalMask(pmask_NxP, 0, p), empty, 0,
                              lora_dropout_key(dropout_key, 0))
    x_BxTxD, _ = apply_block(spec, sliding, params_l, x_BxTxD,
                             positions_from_mask(mask_BxL)[:, p:], CausalMask(mask_BxL, p, t),
                             group_kv_to_rows(spec, kv, group, t), p,
                             lora_dropout_key(dropout_key, 1))
    return x_NxPxD, x_BxTxD


def head_rows(mdef: ModelDef, top: Params, h: Hidden, completion_BxT, temperature: float,
              group: int, chunk: int | None = None, entropy_grad: bool = True
              ) -> tuple[jax.Array, jax.Array]:
    """(logprob, entropy) of every completion token from the last block's hidden states.

    chunk: None computes the logits of all T positions at once; otherwise `chunked_head` runs
    the head over `chunk` positions of every row at a time. entropy_grad: False when nothing
    differentiates the entropy (it is a metric only), which spares its backward.
    """
    spec, t = mdef.spec, completion_BxT.shape[1]
    if chunk is not None:
        if group == 1:
            x_BxTxD = h[0][:, h[0].shape[1] - t - 1:-1]
        else:
            x_NxPxD, x_BxTxD = h
            x_BxTxD = jnp.concatenate([to_rows(x_NxPxD[:, -1:], group), x_BxTxD[:, :t - 1]],
                                      axis=1)
        return chunked_head(spec, top, x_BxTxD, completion_BxT, temperature, chunk,
                            entropy_grad)
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


# -- the head by chunks of the sequence --------------------------------------------------------

# The head weight's gradient is summed into its float32 total one vocabulary block at a time,
# each block's share at most this many bytes: the backward holds no second [V, D] array.
HEAD_GRAD_BLOCK_BYTES = 16 * 2**20


def chunked_head(spec: ModelSpec, top: Params, x_BxTxD: jax.Array, tokens_BxT: jax.Array,
                 temperature: float, chunk: int, entropy_grad: bool = True,
                 vocab_block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p_τ(token), H(p_τ)) at every position of x, the head's input hidden states, with
    at most [B, chunk, V] logits alive at once, in the forward and in the backward.

    The final norm runs on the whole of x (its activations are [B, T, D]); the LM head, the
    soft-cap and the tempered log-softmax run `chunk` positions at a time under a custom VJP
    whose residuals are the normed hidden states, the head weight and the tokens. Its backward
    recomputes each chunk's logits and pulls the chunk's cotangents back through them, adding
    the weight's gradient to its float32 total `vocab_block` vocabulary entries at a time (None:
    blocks of HEAD_GRAD_BLOCK_BYTES), in place. A chunk that does not divide T is padded with
    position 0's token; the padded positions' outputs are cut off and their cotangents are zero.
    """
    x_BxTxD = rms_norm(x_BxTxD, top["final_norm"]["scale"], spec.norm_eps, spec.norm_plus_one)
    w = top["embed"] if spec.tie_embeddings else top["lm_head"]
    if vocab_block is None:
        vocab_block = max(1, HEAD_GRAD_BLOCK_BYTES // (4 * spec.hidden_size))
    opts = _HeadOpts(spec.tie_embeddings, spec.final_softcap, temperature, chunk, entropy_grad,
                     vocab_block)
    return _head_by_chunks(opts, x_BxTxD, w, tokens_BxT)


@dataclasses.dataclass(frozen=True)
class _HeadOpts:
    tied: bool  # w is the embedding [V, D], used transposed
    softcap: float | None
    temperature: float
    chunk: int
    entropy_grad: bool
    vocab_block: int  # vocabulary entries per block of the weight gradient's sum


def _chunk_logits(o: _HeadOpts, x_BxCxD, w):
    """One chunk's logits before the soft-cap, in the weights' dtype (as `head_logits`)."""
    return linear(x_BxCxD, w.T if o.tied else w)


def _chunk_logprobs_entropy(o: _HeadOpts, x_BxCxD, w, tokens_BxC):
    """One chunk's (logprob, entropy), computed as `head_logits` and
    `token_logprobs_and_entropy` compute them."""
    return _logprobs_entropy_of(o, _chunk_logits(o, x_BxCxD, w), tokens_BxC)


def _logprobs_entropy_of(o: _HeadOpts, logits_BxCxV, tokens_BxC):
    logits = logits_BxCxV.astype(jnp.float32)
    logp_BxCxV = tempered_log_softmax(softcap(logits, o.softcap), o.temperature)
    chosen = jnp.take_along_axis(logp_BxCxV, tokens_BxC[..., None], axis=-1)[..., 0]
    if not o.entropy_grad:
        logp_BxCxV = jax.lax.stop_gradient(logp_BxCxV)
    return chosen, -jnp.sum(jnp.exp(logp_BxCxV) * logp_BxCxV, axis=-1)


def _padded(o: _HeadOpts, x_BxT: jax.Array) -> tuple[jax.Array, int]:
    """x padded along axis 1 to a multiple of the chunk, and the number of chunks."""
    t = x_BxT.shape[1]
    n = -(-t // o.chunk)
    pad = [(0, 0)] * x_BxT.ndim
    pad[1] = (0, n * o.chunk - t)
    return jnp.pad(x_BxT, pad), n


def _cols(x_BxT: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x_BxT, i * chunk, chunk, axis=1)


def _unchunk(y_NxBxC: jax.Array, t: int) -> jax.Array:
    """[n, B, chunk, ...] -> [B, T, ...]: the chunks side by side, the padding cut off."""
    n, b, c = y_NxBxC.shape[:3]
    y = jnp.moveaxis(y_NxBxC, 0, 1).reshape(b, n * c, *y_NxBxC.shape[3:])
    return y[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_by_chunks(o: _HeadOpts, x_BxTxD, w, tokens_BxT):
    return _head_by_chunks_fwd(o, x_BxTxD, w, tokens_BxT)[0]


def _head_by_chunks_fwd(o: _HeadOpts, x_BxTxD, w, tokens_BxT):
    t = x_BxTxD.shape[1]
    xp, n = _padded(o, x_BxTxD)
    tp, _ = _padded(o, tokens_BxT)

    def one(i):
        return _chunk_logprobs_entropy(o, _cols(xp, i, o.chunk), w, _cols(tp, i, o.chunk))

    lp_NxBxC, ent_NxBxC = jax.lax.map(one, jnp.arange(n))
    return (_unchunk(lp_NxBxC, t), _unchunk(ent_NxBxC, t)), (x_BxTxD, w, tokens_BxT)


def _head_by_chunks_bwd(o: _HeadOpts, res, cotangents):
    x_BxTxD, w, tokens_BxT = res
    t = x_BxTxD.shape[1]
    xp, n = _padded(o, x_BxTxD)
    tp, _ = _padded(o, tokens_BxT)
    g_lp, _ = _padded(o, cotangents[0])
    g_ent, _ = _padded(o, cotangents[1])

    def one(dw_acc, i):
        x_BxCxD = _cols(xp, i, o.chunk)
        logits = _chunk_logits(o, x_BxCxD, w)
        _, pull = jax.vjp(lambda z: _logprobs_entropy_of(o, z, _cols(tp, i, o.chunk)), logits)
        (dz_BxCxV,) = pull((_cols(g_lp, i, o.chunk), _cols(g_ent, i, o.chunk)))
        # The products `linear`'s backward forms, x·Wᵀ's for the tied head: dx = dz·W and, per
        # vocabulary block, dW = dzᵀ·x (tied, [V, D]) or xᵀ·dz (untied, [D, V]).
        dx = jax.lax.dot_general(dz_BxCxV, w.astype(dz_BxCxV.dtype),
                                 (((2,), (0 if o.tied else 1,)), ((), ())))
        return (_add_weight_grad(o, dw_acc, rows_2d(dz_BxCxV), rows_2d(x_BxCxD)),
                dx.astype(xp.dtype))

    dw, dx_NxBxCxD = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), jnp.arange(n))
    return _unchunk(dx_NxBxCxD, t), dw.astype(w.dtype), None


def _add_weight_grad(o: _HeadOpts, dw_acc, dz_RxV, x_RxD):
    """dw_acc (float32, the head weight's shape) plus this chunk's weight gradient, computed
    and added one vocabulary block at a time, each block written back in place."""
    axis = 0 if o.tied else 1  # the vocabulary axis of the weight
    v, vb = dz_RxV.shape[1], o.vocab_block
    x_RxD = x_RxD.astype(dz_RxV.dtype)

    def add(acc, start, size):
        dz_b = jax.lax.dynamic_slice_in_dim(dz_RxV, start, size, axis=1)
        dims = (((0,), (0,)), ((), ()))
        g = (jax.lax.dot_general(dz_b, x_RxD, dims) if o.tied
             else jax.lax.dot_general(x_RxD, dz_b, dims))
        cur = jax.lax.dynamic_slice_in_dim(acc, start, size, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(acc, cur + g.astype(jnp.float32), start,
                                                   axis=axis)

    full, tail = divmod(v, vb)
    if full:
        dw_acc = jax.lax.fori_loop(0, full, lambda j, acc: add(acc, j * vb, vb), dw_acc)
    return add(dw_acc, full * vb, tail) if tail else dw_acc


_head_by_chunks.defvjp(_head_by_chunks_fwd, _head_by_chunks_bwd)


def sequence_logprobs(mdef: ModelDef, params: Params, prompt_BxP, prompt_mask_BxP,
                      completion_BxT, completion_mask_BxT, temperature: float) -> jax.Array:
    """log π(completion token | prefix) for each completion position, by one full forward."""
    return sequence_logprobs_and_entropy(mdef, params, prompt_BxP, prompt_mask_BxP,
                                         completion_BxT, completion_mask_BxT, temperature)[0]
