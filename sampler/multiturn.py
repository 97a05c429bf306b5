"""Multi-turn rollouts on the sampler mesh: model turns that continue each row's conversation,
and the packing of a row's turns into the trainer's (prompt, completion) layout.

A row is prompt + [model turn, observation]*. The controller drives the turns
(controller/rollout.py: it asks the environment and the tools for each observation); this
module generates the model's side. `TurnSampler.turn` is one compiled program per shape:

    FEED     the tokens the cache does not hold yet, left-padded [B, F], at columns [c, c + F)
    SAMPLE   token 0 of the turn from the feed's last column
    DECODE   a `lax.while_loop` as in `JaxSampler`: feed token t-1, sample token t

Two ways to start a turn after the first (`env.history`):

- "cache" (the default): each row's keys/values stay in one cache buffer across turns; a turn
  feeds only what the cache lacks: the model's last token of the turn before (drawn, never
  fed) and the observation. Rows that stopped early leave masked columns behind them, so a
  row's tokens are not contiguous in the cache; its RoPE positions count its real tokens
  only, so the keys are the ones a contiguous sequence gets (the trainer's). Every decode
  step attends over the whole buffer, so the buffer starts at the prompt's width and grows
  (a copy) by multiples of `sampling.prompt_bucket` as the turns need. Should the masked
  columns take it past what a row can need (prompt + T), a turn re-prefills the histories
  from column 0 instead. Sliding-window layers (Gemma) count cache columns, not positions,
  so they always re-prefill.
- "reprefill": every turn prefills each row's whole history again into a fresh buffer.

bench/multiturn.py measures both (docs/performance.md): "cache" is the faster. Rows whose
conversation is over are not fed and not sampled; a turn ends when every live row has stopped
(a stop id, or its token budget), so rows that finish early never lengthen a turn, and the
rollout ends when every row is done. The sampler's logprobs are log softmax(logits / τ) of
each drawn token, untruncated, as `JaxSampler` reports them (sampler/sampling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sampler.base import left_pad
from sampler.jax_sampler import (
    K_CACHE_AXES,
    V_CACHE_AXES,
    JaxSampler,
    bucket_width,
    decode_step,
    record_token,
)
from trainer.model import (
    apply_model,
    cache_shapes,
    causal_mask,
    init_cache,
    positions_from_mask,
    prefill_groups,
)

# Feed blocks (the model's last token and an observation) are padded to FEED_BUCKET × 2^k
# columns: a few programs for every observation length, and few masked columns per turn.
FEED_BUCKET = 4


@dataclass
class TurnOutput:
    """One model turn of every row, on the host: the ids drawn (empty where the row was not
    live) and their logprobs."""

    ids: list[list[int]]
    logps: list[list[float]]
    decode_steps: int  # the longest row's length: the turn's sequential forward passes
    reprefilled: bool  # the turn prefilled the rows' whole histories


class TurnSampler:
    """Model turns for multi-turn rows on `sampler`'s mesh and weights.

    Args:
      sampler: the job's `JaxSampler` (its weights, mesh, sampling knobs and pad id).
      stop_ids: ids that end a model turn (the tokenizer's, `sampling.stop_tokens`, the
        environment's stop strings).
      max_new_tokens: the most tokens of one model turn.
      total_tokens: T, the most tokens of a row after its prompt (turns and observations).
      history: "cache" or "reprefill" (see the module docstring).
    """

    def __init__(self, sampler: JaxSampler, *, stop_ids: Sequence[int], max_new_tokens: int,
                 total_tokens: int, history: Literal["cache", "reprefill"] = "cache"):
        self.base = sampler
        self.mdef, self.submesh, self.cfg = sampler.mdef, sampler.submesh, sampler.cfg
        self.pad_id = sampler.pad_id
        self.stop_ids = tuple(dict.fromkeys(int(i) for i in stop_ids))
        self.n_new = max_new_tokens
        self.total = total_tokens
        sliding = any(self.mdef.spec.is_sliding(i) for i in range(self.mdef.spec.num_layers))
        self.history = "reprefill" if sliding else history
        self.traces = 0  # programs compiled (see `JaxSampler.metrics`)
        self._turn = jax.jit(self._turn_impl, donate_argnames=("cache",),
                             static_argnames=("fresh", "group"))
        self._rows: list[list[int]] = []  # per row: prompt ids, then every token since
        self._pending: list[list[int]] = []  # per row: ids the cache does not hold yet
        self._state: Any = None  # (cache, valid_BxS, pos_B, next column) in "cache" mode
        self._spare: list | None = None  # a cache buffer to reuse (donated to each turn)
        self._init: dict[tuple[int, ...], Any] = {}  # shapes -> jitted new or widened buffer
        self._span = 0  # the padded prompt width + T: the columns a row may need
        self._group = 1
        self._turns = 0

    # -- a rollout --------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], *, group: int = 1) -> None:
        """Begins a rollout of len(prompts) rows; group > 1: the rows come in groups of
        `group` with one prompt each, prefilled once per group in the first turn."""
        self.finish()
        self._rows = [list(map(int, p)) for p in prompts]
        self._pending = [list(r) for r in self._rows]
        self._span = bucket_width(max(map(len, self._rows)), self.cfg.prompt_bucket) + self.total
        self._group = group
        self._turns = 0

    def observe(self, row: int, ids: Sequence[int]) -> None:
        """Appends an observation's ids to a row (fed at the start of its next turn)."""
        ids = [int(i) for i in ids]
        self._rows[row] += ids
        self._pending[row] += ids

    def turn(self, live: Sequence[bool], budget: Sequence[int], rng: Any) -> TurnOutput:
        """One model turn for the live rows, each at most budget[r] (>= 1) tokens.

        HOST SYNC: the drawn tokens are fetched (the environment needs their text).
        """
        params = self.base.decode_params
        if params is None:
            raise RuntimeError("sampler has no weights yet: call load_weights(params) first")
        b = len(self._rows)
        live_B = np.asarray(live, bool)
        budget_B = np.where(live_B, np.asarray(budget, np.int32), 0).astype(np.int32)
        first = self._turns == 0
        fresh = first or self.history == "reprefill"
        if not fresh:
            cache, valid, pos, col = self._state
            width = bucket_width(max(len(self._pending[r]) for r in range(b) if live_B[r]),
                                 FEED_BUCKET)
            need = col + width + self.n_new - 1
            if need > valid.shape[1]:
                # Attention spans the whole buffer, so it grows with the rollout (a copy, by
                # multiples of sampling.prompt_bucket) rather than starting at its largest.
                # When the masked columns rows leave behind would take it past what a row can
                # need, the turn re-prefills the histories from column 0 instead.
                limit = bucket_width(self._span, self.cfg.prompt_bucket) + self.n_new
                fresh = need > limit
                if fresh:
                    self._keep(cache)
                else:
                    step = self.cfg.prompt_bucket or 1  # a multiple: attention spans it all
                    grown = min(-(-need // step) * step, limit)
                    cache, valid = self._grow(cache, valid, grown)
        if fresh:
            # Every live row's whole history (the prompt, in the first turn).
            feeds = [self._rows[r] if live_B[r] else [] for r in range(b)]
            width = bucket_width(max(len(f) for f in feeds), self.cfg.prompt_bucket)
            cache, col = self._take(b, width + self.n_new - 1), 0
            valid, pos = np.zeros((b, cache[0][1].shape[2]), bool), np.zeros(b, np.int32)
        else:
            feeds = [self._pending[r] if live_B[r] else [] for r in range(b)]
        feed_BxF, fmask_BxF = _left_padded(feeds, width, self.pad_id)
        sh = lambda n: self.submesh.batch_sharding(b, n)  # noqa: E731
        put = jax.device_put
        tokens, logps, mask, cache, valid, pos, steps = self._turn(
            params, cache, put(valid, sh(2)), put(pos, sh(1)), put(feed_BxF, sh(2)),
            put(fmask_BxF, sh(2)), put(np.int32(col), self.submesh.replicated()),
            put(live_B, sh(1)), put(budget_B, sh(1)), put(rng, self.submesh.replicated()),
            fresh=fresh, group=self._group if first else 1)
        tokens, logps, mask, steps = jax.device_get((tokens, logps, mask, steps))
        steps = int(steps)
        ids, lps = [], []
        for r in range(b):
            n = int(mask[r].sum())
            ids.append(tokens[r, :n].tolist())
            lps.append(logps[r, :n].tolist())
            self._rows[r] += ids[r]
            if live_B[r]:
                # Fed: what was pending. A row's last token is fed by the decode step after it,
                # which the longest rows never reach: it waits for the next turn's feed.
                self._pending[r] = ids[r][-1:] if n == steps else []
        if self.history == "cache":
            self._state = (cache, valid, pos, col + width + steps - 1)
        else:
            self._keep(cache)
        self._turns += 1
        return TurnOutput(ids, lps, steps, fresh and not first)

    def finish(self) -> None:
        """Ends the rollout: its cache buffer is kept for the next one of the same shape."""
        if self._state is not None:
            self._keep(self._state[0])
        self._state = None

    def _take(self, b: int, s: int) -> list:
        """A cache buffer [B, ..., S]: the spare one if it has that shape, else a new one."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0][1].shape[:1] + spare[0][1].shape[2:3] == (b, s):
            return spare
        if (b, s) not in self._init:
            spec = self.mdef.spec
            self._init[(b, s)] = jax.jit(lambda: init_cache(spec, b, s),
                                         out_shardings=self._cache_sharding(b, s))
        return self._init[(b, s)]()

    def _keep(self, cache: list) -> None:
        self._spare = cache

    def _grow(self, cache: list, valid: Any, s: int) -> tuple[list, Any]:
        """The cache and its valid columns, widened to `s` columns (zeros, masked)."""
        b, old = valid.shape
        if (b, old, s) not in self._init:
            sh = self._cache_sharding(b, s)

            def grow(cache, valid):
                pad = s - old
                cache = [(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, pad))),
                          jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))) for k, v in cache]
                return jax.lax.with_sharding_constraint(cache, sh), jnp.pad(valid,
                                                                            ((0, 0), (0, pad)))

            self._init[(b, old, s)] = jax.jit(grow, donate_argnums=(0,))
        return self._init[(b, old, s)](cache, valid)

    # -- the program ------------------------------------------------------------------------

    def _cache_sharding(self, b: int, s: int) -> Any:
        k_shape, v_shape = cache_shapes(self.mdef.spec, b, s)
        pair = (self.submesh.sharding(K_CACHE_AXES, k_shape),
                self.submesh.sharding(V_CACHE_AXES, v_shape))
        return [pair for _ in range(self.mdef.spec.num_layers)]

    def _turn_impl(self, params, cache, valid_BxS, pos_B, feed_BxF, fmask_BxF, col0, live_B,
                   budget_B, rng, *, fresh: bool, group: int):
        self.traces += 1  # runs only while tracing: once per compiled program
        mdef, n_new = self.base.decode_mdef, self.n_new  # params: the decode layout
        b, f = feed_BxF.shape
        s = valid_BxS.shape[1]
        cache_sh = self._cache_sharding(b, s)
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)

        def stopped(tok_B):
            if not self.stop_ids:
                return jnp.zeros(tok_B.shape, bool)
            return jnp.isin(tok_B, stop_ids)

        sample = self.base.token_sampler(rng, n_new, b)  # as the single-turn sampler draws

        # FEED: what the cache lacks, at columns [col0, col0 + F); a fresh turn starts from a
        # zeroed buffer (a stale NaN in a masked column would leak through 0 * NaN).
        valid_BxS = jax.lax.dynamic_update_slice_in_dim(valid_BxS, fmask_BxF, col0, axis=1)
        if fresh and group > 1:
            logits_BxV, cache = prefill_groups(mdef, params, feed_BxF, fmask_BxF, group, s - f,
                                               cache[0][0].dtype)
        else:
            if fresh:
                cache = jax.tree.map(jnp.zeros_like, cache)
            cache = jax.lax.with_sharding_constraint(cache, cache_sh)
            positions_BxF = pos_B[:, None] + positions_from_mask(fmask_BxF)
            logits_Bx1xV, cache = apply_model(mdef, params, feed_BxF, positions_BxF,
                                              causal_mask(valid_BxS, col0, f), cache, col0,
                                              logit_cols=slice(f - 1, f))
            logits_BxV = logits_Bx1xV[:, 0]
        cache = jax.lax.with_sharding_constraint(cache, cache_sh)
        pos_B = pos_B + jnp.sum(fmask_BxF, axis=1, dtype=jnp.int32)

        # SAMPLE token 0 of the turn for the live rows.
        tok_B, lp_B, _ = sample(logits_BxV)
        tok_B = jnp.where(live_B, tok_B, self.pad_id)
        tokens_BxT = jnp.full((b, n_new), self.pad_id, jnp.int32).at[:, 0].set(tok_B)
        logps_BxT = jnp.zeros((b, n_new), jnp.float32).at[:, 0].set(jnp.where(live_B, lp_B, 0))
        mask_BxT = jnp.zeros((b, n_new), bool).at[:, 0].set(live_B)
        done_B = ~live_B | stopped(tok_B) | (budget_B <= 1)
        c = col0 + f  # the column of the turn's token 0, once fed

        # DECODE: step t feeds token t-1 (where the row drew one) and samples token t.
        def cond(carry):
            t, done_B = carry[0], carry[6]
            return (t < n_new) & ~jnp.all(done_B)

        def body(carry):
            t, cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, done_B, valid_BxS, pos_B = carry
            col = c + t - 1
            fed_B = jax.lax.dynamic_index_in_dim(mask_BxT, t - 1, axis=1, keepdims=False)
            valid_BxS = jax.lax.dynamic_update_slice_in_dim(valid_BxS, fed_B[:, None], col, 1)
            logits_BxV, cache = decode_step(mdef, params, tok_B, pos_B, valid_BxS, col, cache)
            pos_B = pos_B + fed_B.astype(jnp.int32)
            tok_B, lp_B, _ = sample(logits_BxV, t)
            live_B = ~done_B
            tok_B, tokens_BxT, logps_BxT, mask_BxT = record_token(
                tokens_BxT, logps_BxT, mask_BxT, tok_B, lp_B, live_B, t, self.pad_id)
            done_B = done_B | stopped(tok_B) | (t + 1 >= budget_B)
            return (t + 1, cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, done_B, valid_BxS,
                    pos_B)

        init = (jnp.int32(1), cache, tok_B, tokens_BxT, logps_BxT, mask_BxT, done_B, valid_BxS,
                pos_B)
        t, cache, _, tokens_BxT, logps_BxT, mask_BxT, _, valid_BxS, pos_B = \
            jax.lax.while_loop(cond, body, init)
        cache = jax.lax.with_sharding_constraint(cache, cache_sh)
        # The longest row's length; a row whose last token is the t-th was never fed it.
        steps = jnp.max(jnp.sum(mask_BxT, axis=1)).astype(jnp.int32)
        del t
        return tokens_BxT, logps_BxT, mask_BxT, cache, valid_BxS, pos_B, steps


def _left_padded(feeds: Sequence[Sequence[int]], width: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Id lists -> ([B, width] ids, mask), each row right-aligned."""
    tokens = np.full((len(feeds), width), pad_id, np.int32)
    mask = np.zeros((len(feeds), width), bool)
    for r, f in enumerate(feeds):
        if f:
            tokens[r, width - len(f):] = f
            mask[r, width - len(f):] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Packing: a row's turns -> the trainer's layout


@dataclass
class PackedTurns:
    """Rows of turns in the trainer's (prompt, completion) layout, [B, T] each."""

    tokens_BxT: np.ndarray  # model and observation tokens, in order; pad after
    mask_BxT: np.ndarray  # every real token (attended by the trainer)
    model_mask_BxT: np.ndarray  # the model's own tokens: what carries loss
    logps_BxT: np.ndarray  # the sampler's logprob of each model token; 0 elsewhere


def pack_turns(rows: Sequence[Sequence[tuple[Sequence[int], Sequence[float] | None]]],
               width: int, pad_id: int) -> PackedTurns:
    """Each row's segments, in order, as the completion columns the trainer takes.

    A segment is (ids, logprobs) for a model turn and (ids, None) for an observation (the
    environment's or a tool's tokens, and template text between turns). Only model tokens are
    marked in `model_mask_BxT` and carry a logprob; all real tokens are in `mask_BxT`.
    Raises ValueError when a row is longer than `width` (the caller's token budget).
    """
    b = len(rows)
    tokens = np.full((b, width), pad_id, np.int32)
    mask = np.zeros((b, width), bool)
    model = np.zeros((b, width), bool)
    logps = np.zeros((b, width), np.float32)
    for r, segments in enumerate(rows):
        at = 0
        for ids, lps in segments:
            n = len(ids)
            if at + n > width:
                raise ValueError(f"row {r} has {at + n} tokens after its prompt, more than "
                                 f"the {width} columns of the batch")
            tokens[r, at:at + n] = ids
            mask[r, at:at + n] = True
            if lps is not None:
                if len(lps) != n:
                    raise ValueError(f"row {r}: a model turn of {n} ids has {len(lps)} logprobs")
                model[r, at:at + n] = True
                logps[r, at:at + n] = lps
            at += n
    return PackedTurns(tokens, mask, model, logps)


def pad_prompts_left(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Prompt id lists -> left-padded ([B, P] ids, mask), P a bucket width (as generate pads)."""
    longest = max(len(p) for p in prompts)
    tokens, mask = _left_padded(prompts, longest, pad_id)
    return left_pad(tokens, mask, bucket_width(longest, bucket), pad_id)
