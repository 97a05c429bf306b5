"""The JAX-native sampler: prefill + decode in one compiled loop over a KV cache.

Prompts are left-padded, so every row writes its next token into the same cache column; a row's
own positions (for RoPE) count only its real tokens. The decode loop is a `lax.while_loop` that
stops early once every row has emitted a stop token. Params are jit arguments, never closed
over: pushing new weights reuses the compiled program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import SamplingConfig
from sampler.base import Completions, WeightMismatchError
from sampler.sampling import sample_tokens
from trainer.model import ModelDef, apply_model, causal_mask, init_cache, positions_from_mask


class JaxSampler:
    """Generates completions with per-token logprobs on the sampler sub-mesh."""

    def __init__(self, mdef: ModelDef, submesh: Any, cfg: SamplingConfig, *, pad_id: int,
                 stop_ids: tuple[int, ...], param_dtype: Any = None):
        self.mdef = mdef
        self.submesh = submesh
        self.cfg = cfg
        self.pad_id = pad_id
        self.stop_ids = tuple(stop_ids)
        self.shardings = jax.tree.map(
            lambda axes, shape: submesh.sharding(axes, shape.shape),
            mdef.logical_axes, mdef.shapes(), is_leaf=lambda x: isinstance(x, tuple),
        )
        # param_dtype (reshard.dtype): the dtype the weight sync sends floating params in.
        self._expected = jax.tree.map(
            lambda s: (s.shape, jnp.dtype(param_dtype) if param_dtype is not None
                       and jnp.issubdtype(s.dtype, jnp.floating) else s.dtype), mdef.shapes())
        self._params: Any = None
        self._generate = jax.jit(self._generate_impl)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, params: Any) -> None:
        """Takes new weights; rejects a tree that does not match the model exactly."""
        want = jax.tree.structure(self._expected, is_leaf=lambda x: isinstance(x, tuple))
        got = jax.tree.structure(params)
        if want != got:
            raise WeightMismatchError(
                f"load_weights: tree structure differs from the model's.\n  expected: {want}\n"
                f"  got:      {got}"
            )
        flat_want = jax.tree_util.tree_leaves_with_path(
            self._expected, is_leaf=lambda x: isinstance(x, tuple))
        for (path, (shape, dtype)), leaf, sh in zip(
            flat_want, jax.tree.leaves(params), jax.tree.leaves(self.shardings), strict=True
        ):
            name = jax.tree_util.keystr(path)
            if tuple(leaf.shape) != tuple(shape) or leaf.dtype != dtype:
                raise WeightMismatchError(
                    f"load_weights: {name} is {leaf.dtype}{list(leaf.shape)}, the model needs "
                    f"{dtype}{list(shape)}"
                )
            if getattr(leaf, "sharding", None) is not None and leaf.sharding != sh:
                raise WeightMismatchError(
                    f"load_weights: {name} has sharding {leaf.sharding}, the sampler needs {sh} "
                    f"(fix: reshard the tree to sampler.shardings first)"
                )
        self._params = params

    @property
    def params(self) -> Any:
        return self._params

    # -- generation ------------------------------------------------------------------------

    def generate(self, prompt_tokens_BxP: Any, prompt_mask_BxP: Any, rng: Any) -> Completions:
        if self._params is None:
            raise RuntimeError("sampler has no weights yet: call load_weights(params) first")
        tokens = np.asarray(prompt_tokens_BxP, np.int32)
        mask = np.asarray(prompt_mask_BxP, bool)
        sh = self.submesh.batch_sharding(tokens.shape[0], 2)
        tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)
        rng = jax.device_put(rng, self.submesh.replicated())
        out_tokens, out_logps, out_mask = self._generate(self._params, tokens, mask, rng)
        return Completions(out_tokens, out_logps, out_mask)

    def _generate_impl(self, params, prompt_BxP, pmask_BxP, rng):
        spec, n_new = self.mdef.spec, self.cfg.max_new_tokens
        b, p = prompt_BxP.shape
        s = p + n_new
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)

        # PREFILL: the whole prompt in one pass, keys/values into cache columns [0, P).
        cache = init_cache(spec, b, s)
        valid_BxS = jnp.concatenate([pmask_BxP, jnp.zeros((b, n_new), bool)], axis=1)
        positions_BxP = positions_from_mask(pmask_BxP)
        logits_BxPxV, cache = apply_model(self.mdef, params, prompt_BxP, positions_BxP,
                                          causal_mask(valid_BxS, 0, p), cache, 0)

        # DECODE: sample token t from the current logits, then feed it at column P + t.
        def cond(carry):
            t, done_B = carry[0], carry[5]
            return (t < n_new) & ~jnp.all(done_B)

        def body(carry):
            t, cache, logits_BxV, tokens_BxT, logps_BxT, done_B, mask_BxT, valid_BxS, pos_B, rng = (
                carry)
            rng, key = jax.random.split(rng)
            tok_B, lp_B = sample_tokens(logits_BxV, key, self.cfg.temperature)
            live_B = ~done_B
            tok_B = jnp.where(live_B, tok_B, self.pad_id)
            tokens_BxT = tokens_BxT.at[:, t].set(tok_B)
            logps_BxT = logps_BxT.at[:, t].set(jnp.where(live_B, lp_B, 0.0))
            mask_BxT = mask_BxT.at[:, t].set(live_B)
            done_B = done_B | jnp.isin(tok_B, stop_ids)
            valid_BxS = valid_BxS.at[:, p + t].set(True)
            logits_Bx1xV, cache = apply_model(
                self.mdef, params, tok_B[:, None], pos_B[:, None],
                causal_mask(valid_BxS, p + t, 1), cache, p + t)
            return (t + 1, cache, logits_Bx1xV[:, 0], tokens_BxT, logps_BxT, done_B, mask_BxT,
                    valid_BxS, pos_B + 1, rng)

        init = (
            jnp.int32(0), cache, logits_BxPxV[:, -1],
            jnp.full((b, n_new), self.pad_id, jnp.int32), jnp.zeros((b, n_new), jnp.float32),
            jnp.zeros((b,), bool), jnp.zeros((b, n_new), bool), valid_BxS,
            positions_BxP[:, -1] + 1, rng,
        )
        out = jax.lax.while_loop(cond, body, init)
        return out[3], out[4], out[6]
