"""The JAX-native sampler: prefill + decode in one compiled loop over a KV cache.

One `generate` call is one jitted program on the sampler sub-mesh:

    PREFILL  the left-padded prompts [B, P] in one forward pass; keys/values -> cache [0, P)
    DECODE   a `lax.while_loop`: feed the last token at column P + t - 1, sample token t

Design choices, each for speed or for never recompiling:

- Left padding puts every row's next token in the same cache column, so a decode step is one
  [B, 1] forward; a row's RoPE positions count only its real tokens (`positions_from_mask`).
- The loop samples token 0 from the prefill logits and runs a forward only to get the logits of
  a token it will sample, so T new tokens cost one prefill and T - 1 decode forwards (no wasted
  pass after the last token), and the cache needs only P + T - 1 columns.
- Rows stop independently on any stop token (the tokenizer's EOS plus `sampling.stop_tokens`);
  the loop exits as soon as every row has stopped.
- Params are jit *arguments*: a weight push (`load_weights`, which checks structure, shape,
  dtype and placement) reuses the compiled program. Prompt widths are padded up to a bucket
  (`sampling.prompt_bucket`), so a new prompt width reuses one too. `metrics()` counts compiles.
- The KV cache is a buffer the sampler keeps between calls and *donates* to the program, which
  zeroes and fills it in place (no fresh allocation per call; zeroing keeps a stale NaN from an
  earlier bad batch out of masked columns, where 0 * NaN would leak through the attention).
- Sharding is declared: params follow the sampler mesh's rules (tensor-parallel heads, kv
  heads, MLP and vocab by default, `topology.sampler_rules`); the cache holds keys as
  ("batch", "kv_heads", "head_dim", None) and values as ("batch", "kv_heads", None,
  "head_dim") under the same rules (keys transposed: see `trainer.model.Attention`);
  prompts are split over the "batch" rule's axis. XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import SamplingConfig
from sampler.base import Completions, check_weights, left_pad
from sampler.sampling import sample_tokens
from trainer.model import (
    ModelDef,
    apply_model,
    cache_shapes,
    causal_mask,
    define_model,
    init_cache,
    out_major_params,
    param_shardings,
    positions_from_mask,
    prefill_groups,
)

# Logical axes of each layer's cached keys [B, K, Dh, S] and values [B, K, S, Dh].
K_CACHE_AXES = ("batch", "kv_heads", "head_dim", None)
V_CACHE_AXES = ("batch", "kv_heads", None, "head_dim")


def bucket_width(width: int, bucket: int | None) -> int:
    """The padded prompt width: the smallest bucket * 2^k >= width (width itself if None)."""
    if bucket is None:
        return width
    out = bucket
    while out < width:
        out *= 2
    return out


def prefill(mdef: ModelDef, params: Any, prompt_BxP: jax.Array, valid_BxS: jax.Array,
            cache: list) -> tuple[jax.Array, list]:
    """Runs the prompts through the model, writing cache columns [0, P).

    valid_BxS marks the cache columns holding real tokens (the prompt mask, then False).
    Returns (logits_BxV of the last prompt column, the only ones sampled from; cache).
    """
    p = prompt_BxP.shape[1]
    positions_BxP = positions_from_mask(valid_BxS[:, :p])
    logits_Bx1xV, cache = apply_model(mdef, params, prompt_BxP, positions_BxP,
                                      causal_mask(valid_BxS, 0, p), cache, 0,
                                      logit_cols=slice(p - 1, p))
    return logits_Bx1xV[:, 0], cache


def record_token(tokens_BxT: jax.Array, logps_BxT: jax.Array, mask_BxT: jax.Array,
                 tok_B: jax.Array, lp_B: jax.Array, live_B: jax.Array, t: jax.Array,
                 pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Writes step t's tokens and logprobs into the outputs: rows already done get the pad id,
    logprob 0 and mask False. Returns (the tokens as written, tokens, logprobs, mask)."""
    tok_B = jnp.where(live_B, tok_B, pad_id)
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, tok_B[:, None], t, 1)
    logps_BxT = jax.lax.dynamic_update_slice_in_dim(
        logps_BxT, jnp.where(live_B, lp_B, 0.0)[:, None], t, 1)
    mask_BxT = jax.lax.dynamic_update_slice_in_dim(mask_BxT, live_B[:, None], t, 1)
    return tok_B, tokens_BxT, logps_BxT, mask_BxT


def decode_step(mdef: ModelDef, params: Any, tok_B: jax.Array, pos_B: jax.Array,
                valid_BxS: jax.Array, col: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """Feeds one token per row at cache column `col` (position pos_B); returns (logits_BxV,
    cache). valid_BxS must already mark `col` (a token attends to itself)."""
    logits_Bx1xV, cache = apply_model(mdef, params, tok_B[:, None], pos_B[:, None],
                                      causal_mask(valid_BxS, col, 1), cache, col)
    return logits_Bx1xV[:, 0], cache


class JaxSampler:
    """Generates completions with per-token logprobs on the sampler sub-mesh."""

    def __init__(self, mdef: ModelDef, submesh: Any, cfg: SamplingConfig, *, pad_id: int,
                 stop_ids: tuple[int, ...], param_dtype: Any = None):
        self.mdef = mdef
        # On one device the programs run the model on weights held output-major, q/k/v and
        # gate/up joined (ModelSpec.out_major, fused_projections), moved once per push: each
        # decode step streams them in the order its products read fastest. On a mesh of
        # several devices the weights stay as pushed (measured: moving them there made the
        # GRPO step's sampling slower, not faster).
        self.shardings = param_shardings(mdef, submesh)
        one = submesh.size == 1
        self.decode_mdef = (define_model(dataclasses.replace(mdef.spec, out_major=True,
                                                             fused_projections=True))
                            if one else mdef)
        self.submesh = submesh
        self.cfg = cfg
        self.pad_id = pad_id
        # The tokenizer's EOS first, then sampling.stop_tokens; duplicates dropped.
        self.stop_ids = tuple(dict.fromkeys((*stop_ids, *cfg.stop_tokens)))
        vocab = mdef.spec.vocab_size
        bad = [t for t in self.stop_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"sampling.stop_tokens={list(cfg.stop_tokens)}: ids {bad} are outside the "
                f"model's vocabulary [0, {vocab}) (fix: use token ids below {vocab})"
            )
        # param_dtype (reshard.dtype): the dtype the weight sync sends floating params in.
        self._expected = jax.tree.map(
            lambda s: (s.shape, jnp.dtype(param_dtype) if param_dtype is not None
                       and jnp.issubdtype(s.dtype, jnp.floating) else s.dtype), mdef.shapes())
        self._decode_params: Any = None  # the pushed weights, matmul weights output-major
        self._to_decode = (jax.jit(lambda p: out_major_params(p, fuse=True)) if one
                           else lambda p: p)
        self._to_canonical = (jax.jit(lambda p: out_major_params(p, inverse=True, fuse=True),
                                      out_shardings=self.shardings) if one else lambda p: p)
        self._cache: tuple[tuple[int, int], list] | None = None  # ((B, S), donated buffer)
        self._traces = 0  # how many times generate was traced = compiled (see metrics())
        self._last: dict[str, Any] = {}
        self._generate = jax.jit(self._generate_impl, donate_argnames=("cache",),
                                 static_argnames=("group",))

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, params: Any) -> None:
        """Takes new weights; rejects a tree that does not match the model exactly.

        Structure, shapes, dtypes and shardings must all equal the compiled program's, which is
        also what guarantees that a push never recompiles.
        """
        check_weights(params, self._expected, self.shardings)
        self._decode_params = None  # the old weights go before the new copy is made
        self._decode_params = self._to_decode(params)

    @property
    def params(self) -> Any:
        """The weights held, in the model's canonical layout and the sampler's shardings (a
        copy moved back from the decode layout: for evaluation and checks, not per step)."""
        if self._decode_params is None:
            return None
        return self._to_canonical(self._decode_params)

    @property
    def decode_params(self) -> Any:
        """The weights as the programs take them: matmul weights output-major."""
        return self._decode_params

    # -- generation ------------------------------------------------------------------------

    def generate(self, prompt_tokens_BxP: Any, prompt_mask_BxP: Any, rng: Any, *,
                 group: int = 1) -> Completions:
        """Completions for left-padded prompts; returns device arrays (no host sync here).

        group > 1: rows come in consecutive groups of `group` with one prompt each, and each
        prompt is prefilled once per group (see `trainer.model.prefill_groups`).
        """
        if self._decode_params is None:
            raise RuntimeError("sampler has no weights yet: call load_weights(params) first")
        tokens = np.asarray(prompt_tokens_BxP, np.int32)
        mask = np.asarray(prompt_mask_BxP, bool)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(
                f"generate: prompt tokens {tokens.shape} and mask {mask.shape} must be the same "
                f"[B, P] shape"
            )
        if group < 1 or tokens.shape[0] % group:
            raise ValueError(f"generate: {tokens.shape[0]} rows do not form groups of {group}")
        width = bucket_width(tokens.shape[1], self.cfg.prompt_bucket)
        tokens, mask = left_pad(tokens, mask, width, self.pad_id)
        b = tokens.shape[0]
        sh = self.submesh.batch_sharding(b, 2)
        tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)
        rng = jax.device_put(rng, self.submesh.replicated())
        cache = self._take_cache(b, width + self.cfg.max_new_tokens - 1)
        out_tokens, out_logps, out_mask, kept_mass, cache = self._generate(
            self._decode_params, tokens, mask, rng, cache, group=group)
        self._cache = ((b, width + self.cfg.max_new_tokens - 1), cache)
        self._last = {"prompt_width": width, "kept_mass": kept_mass}
        return Completions(out_tokens, out_logps, out_mask)

    def metrics(self) -> dict[str, float]:
        """sampler/compiles (programs built so far), the last call's padded prompt width and
        mean kept mass Z of top-k/top-p (1 when off). Reading kept_mass waits for the last
        generate: a HOST SYNC, cheap after the caller has fetched the completions."""
        out = {"sampler/compiles": float(self._traces)}
        if self._last:
            out["sampler/prompt_width"] = float(self._last["prompt_width"])
            out["sampler/kept_mass"] = float(self._last["kept_mass"])
        return out

    def _take_cache(self, b: int, s: int) -> list:
        """The kept cache buffer if its shape fits, else a new one (the old one is freed)."""
        if self._cache is not None and self._cache[0] == (b, s):
            cache, self._cache = self._cache[1], None  # donated: must not be reused after
            return cache
        self._cache = None
        spec = self.mdef.spec
        sharding = self._cache_sharding(b, s)
        return jax.jit(lambda: init_cache(spec, b, s), out_shardings=sharding)()

    def token_sampler(self, rng: jax.Array, n_new: int, b: int):
        """sample(logits_BxV, t) -> (tokens, logprobs, kept) for step t of n_new, on b rows
        (traced inside a generate program).

        One split per token: token t is drawn with the second half, the first carries on. The
        uniforms of all n_new steps ([T, B], one per row: `sampling.inverse_cdf`) are drawn
        from those keys up front in one vectorised pass, not n_new small ones in the loop.
        """
        cfg = self.cfg

        def split(r, _):
            r, key = jax.random.split(r)
            return r, key

        _, keys_T = jax.lax.scan(split, rng, None, length=n_new)
        uniform_TxB = jax.lax.with_sharding_constraint(  # split like the rows they draw for
            jax.vmap(lambda k: jax.random.uniform(k, (b,), jnp.float32))(keys_T),
            self.submesh.sharding((None, "batch"), (n_new, b)))

        def sample(logits_BxV, t=0):
            u_B = jax.lax.dynamic_index_in_dim(uniform_TxB, t, keepdims=False)
            return sample_tokens(logits_BxV, rng, cfg.temperature, cfg.top_k, cfg.top_p, u_B)

        return sample

    def _cache_sharding(self, b: int, s: int) -> Any:
        spec = self.mdef.spec
        k_shape, v_shape = cache_shapes(spec, b, s)
        pair = (self.submesh.sharding(K_CACHE_AXES, k_shape),
                self.submesh.sharding(V_CACHE_AXES, v_shape))
        return [pair for _ in range(spec.num_layers)]

    def _generate_impl(self, params, prompt_BxP, pmask_BxP, rng, cache, group: int = 1):
        self._traces += 1  # runs only while tracing, i.e. once per compiled program
        cfg, mdef = self.cfg, self.decode_mdef  # params: the decode layout
        n_new = cfg.max_new_tokens
        b, p = prompt_BxP.shape
        cache_sh = self._cache_sharding(b, p + n_new - 1)
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)

        sample = self.token_sampler(rng, n_new, b)

        def stopped(tok_B):
            if not self.stop_ids:
                return jnp.zeros(tok_B.shape, bool)
            return jnp.isin(tok_B, stop_ids)

        valid_BxS = jnp.concatenate([pmask_BxP, jnp.zeros((b, n_new - 1), bool)], axis=1)
        if group == 1:
            # PREFILL: zero the donated cache in place, then the whole prompt in one pass.
            cache = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, cache),
                                                     cache_sh)
            logits_BxV, cache = prefill(mdef, params, prompt_BxP, valid_BxS, cache)
        else:
            # PREFILL once per group of G rows with the same prompt; each row gets its group's
            # keys/values and last logits (the donated buffer takes the result).
            logits_BxV, cache = prefill_groups(mdef, params, prompt_BxP, pmask_BxP, group,
                                               n_new - 1, cache[0][0].dtype)
            cache = jax.lax.with_sharding_constraint(cache, cache_sh)
        tok_B, lp_B, kept_B = sample(logits_BxV)
        tokens_BxT = jnp.full((b, n_new), self.pad_id, jnp.int32).at[:, 0].set(tok_B)
        logps_BxT = jnp.zeros((b, n_new), jnp.float32).at[:, 0].set(lp_B)
        mask_BxT = jnp.zeros((b, n_new), bool).at[:, 0].set(True)
        pos_B = positions_from_mask(pmask_BxP)[:, -1] + 1  # position of token 0

        # DECODE: step t feeds token t-1 at column P + t - 1 and samples token t.
        def cond(carry):
            t, done_B = carry[0], carry[6]
            return (t < n_new) & ~jnp.all(done_B)

        def body(carry):
            (t, cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, done_B, valid_BxS, pos_B,
             kept) = carry
            col = p + t - 1
            valid_BxS = jax.lax.dynamic_update_slice_in_dim(
                valid_BxS, jnp.ones((b, 1), bool), col, axis=1)
            logits_BxV, cache = decode_step(mdef, params, tok_B, pos_B, valid_BxS, col, cache)
            tok_B, lp_B, kept_B = sample(logits_BxV, t)
            live_B = ~done_B
            tok_B, tokens_BxT, logps_BxT, mask_BxT = record_token(
                tokens_BxT, logps_BxT, mask_BxT, tok_B, lp_B, live_B, t, self.pad_id)
            kept = kept + jnp.sum(jnp.where(live_B, kept_B, 0.0))
            done_B = done_B | stopped(tok_B)
            return (t + 1, cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, done_B, valid_BxS,
                    pos_B + 1, kept)

        init = (jnp.int32(1), cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, stopped(tok_B),
                valid_BxS, pos_B, jnp.sum(kept_B))
        out = jax.lax.while_loop(cond, body, init)
        _, cache, _, tokens_BxT, logps_BxT, mask_BxT, _, _, _, kept = out
        kept_mean = kept / jnp.maximum(jnp.sum(mask_BxT), 1).astype(jnp.float32)
        cache = jax.lax.with_sharding_constraint(cache, cache_sh)
        return tokens_BxT, logps_BxT, mask_BxT, kept_mean, cache
