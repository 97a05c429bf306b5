"""The GRPO update as a chain of per-layer programs: `LayeredUpdate(step)(state, ...)`.

For one optimizer step on one microbatch (μ = 1, one minibatch, no accumulation: the common
GRPO setting) this computes what `UpdateStep.update` (trainer/step.py) computes, as separate
jitted programs: the reference logprobs; the embedding; each block's forward, which returns its
pullback (a pytree of the residuals its backward needs); the head and loss with their gradient;
each block's backward, last block first; the embedding's backward (added in place to the
head's gradient of a tied embedding); the optimizer step.

Why: XLA compiles a block once however many layers share its kind, so the first update
compiles ~2 of the model's L blocks' worth of code instead of 2·L; and each program's
temporaries are a block's, small enough for malloc to reuse between calls instead of mapping
and faulting in one large buffer per call. The values are those of the one-program update up
to float rounding: the embedding's two gradient terms are summed in another order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainer import lora
from trainer.logprobs import (
    Hidden,
    block_rows,
    embed_rows,
    head_rows,
    rematerialized,
    with_attention_chunk,
)
from trainer.loss import aggregation_weights
from trainer.model import Params, top_params
from trainer.step import Batch, UpdateStep

# The smallest model (in parameters) whose update runs as per-layer programs by default. The
# layered update compiles each kind of block once rather than every layer, and keeps each
# program's temporaries small; in exchange, each of its programs (4 + 2·L for L layers, 6 + 3·L
# with the reference model's KL in the loss, one fewer under LoRA) costs a launch on every
# device, with its collectives. Below this size the update is short enough that those
# launches cost more than the smaller compile and temporaries save.
LAYERED_MIN_PARAMS = 1_000_000


def call(fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """Runs one of the layered update's programs (the default runner of `LayeredUpdate`)."""
    return fn(*args, **static)


class LayeredUpdate:
    """One optimizer step on one microbatch as per-layer programs (see the module docstring).

    Calling it runs the update; `logprobs` runs a forward by the same programs; `lower_ahead`
    is a runner that traces and lowers each program instead of running it (`Trainer.pretrace`).
    The loss, optimizer step and metrics are `step`'s, so the two updates cannot drift apart.
    """

    def __init__(self, step: UpdateStep):
        self.step = step
        # One compile per program and kind of layer (sliding or global attention), without
        # the trainer's CPU heap split (trainer/cpu_heap.py): a program's temporaries here are
        # one block's, and where they outgrow a heap, each large buffer gets a heap of its own
        # that no other buffer shares, which at long sequences doubles what the program holds.
        self._head_logps_j = jax.jit(self._head_logps, static_argnames=("group",))
        self._embed_j = jax.jit(self._embed, static_argnames=("group",))
        self._block_fwd_j = jax.jit(self._block_fwd, static_argnames=("sliding", "group"))
        self._block_j = jax.jit(self._block, static_argnames=("sliding", "group", "adapters_off"))
        self._block_bwd_j = jax.jit(self._block_bwd)
        self._head_j = jax.jit(self._head, static_argnames=("group",))
        self._embed_grad_j = jax.jit(self._embed_grad, donate_argnums=(0,),
                                     static_argnames=("group",),
                                     out_shardings=top_params(step.shardings))
        self._finish_j = jax.jit(self._finish, donate_argnums=(0,), static_argnames=("group",),
                                 out_shardings=(step.state_shardings, step.submesh.replicated()))

    def __call__(self, state, ref_params, b: Batch, off_policy, group: int = 1,
                 run: Callable[..., Any] = call):
        """(new state, metrics), as `UpdateStep.update` returns them; the state is donated.
        ref_params: the frozen half (see trainer/step.py). run: how each program is run
        (`call`, or `lower_ahead` to trace them ahead)."""
        step, spec = self.step, self.step.mdef.spec
        trained = state["params"]
        ref_logps = None
        if step.kl_in_loss(ref_params):
            if step.lora:  # the base with the adapters switched off
                ref_logps = self.logprobs(trained, ref_params, b, group, run, adapters_off=True)
            else:
                ref_logps = self.logprobs(ref_params, None, b, group, run)
        top = top_params(step.policy(trained, ref_params))
        h = run(self._embed_j, top, b, group=group)
        pullbacks = []
        for i in range(spec.num_layers):
            # LoRA dropout: the update's count and the layer, from which the block's program
            # draws the key the one-program update uses (optimizer step 0, microbatch 0).
            dropout = (state["step"], np.int32(i)) if step.dropout else None
            h, pullback = run(self._block_fwd_j, *self._layer(trained, ref_params, i), h, b,
                              dropout, sliding=spec.is_sliding(i), group=group)
            pullbacks.append(pullback)
        aux, g_top, dh = run(self._head_j, top, h, b, ref_logps, off_policy, group=group)
        g_layers: list[Any] = [None] * spec.num_layers
        for i in reversed(range(spec.num_layers)):
            g_layers[i], dh = run(self._block_bwd_j, pullbacks.pop(), dh)  # frees residuals
        if not step.lora:  # the embedding lookup's gradient, added to the head's in place
            g_top = run(self._embed_grad_j, g_top, dh, b, group=group)
        return run(self._finish_j, state, g_top, g_layers, b, aux, group=group)

    def _layer(self, trained: Params, frozen: Params | None, i: int) -> tuple[Params, Params]:
        """Layer i's (trained params, frozen params): under LoRA its adapters and its base
        weights, else all its params and nothing."""
        if self.step.lora:
            return trained["layers"][i], frozen["layers"][i]
        return trained["layers"][i], {}

    def logprobs(self, trained: Params, frozen: Params | None, b: Batch, group: int,
                 run: Callable[..., Any] = call, adapters_off: bool = False) -> jax.Array:
        """Logprobs (no gradient) by the layered update's programs: the embedding, a block's
        forward without the residuals a backward needs, and the head. adapters_off: LoRA's
        reference forward (the base alone)."""
        spec = self.step.mdef.spec
        top = top_params(self.step.policy(trained, frozen))
        h = run(self._embed_j, top, b, group=group)
        for i in range(spec.num_layers):
            h = run(self._block_j, *self._layer(trained, frozen, i), h, b,
                    sliding=spec.is_sliding(i), group=group, adapters_off=adapters_off)
        return run(self._head_logps_j, top, h, b, group=group)

    def lower_ahead(self, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """A runner for `__call__` that traces and lowers one program for abstract arguments
        and returns its outputs as abstract values with the shardings the program pins them
        to, so that the next program is traced for exactly the arguments the real call
        passes. A block's backward takes its forward's residuals, whose layout only the
        compiler decides: it is left to the real call (its trace is the cheapest)."""
        step = self.step

        def like(tree: Any, sharding: Any) -> Any:
            return jax.tree.map(
                lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), tree, sharding)

        def rows(tree: Any) -> Any:
            return jax.tree.map(lambda o: like(o, step.row_sharding(o)), tree)

        if fn is self._block_bwd_j:
            return like(step.trained_shapes()["layers"][0], step.shardings["layers"][0]), args[1]
        traced = fn.trace(*args, **static)
        traced.lower()
        out = traced.out_info
        if fn is self._block_fwd_j:
            return rows(out[0]), None
        if fn is self._embed_grad_j:
            return like(out, top_params(step.shardings))
        if fn is self._head_j:
            aux, g_top, dh = out
            return (jax.tree.map(lambda o: like(o, step.submesh.replicated()), aux),
                    like(g_top, top_params(step.shardings)), rows(dh))
        return None if fn is self._finish_j else rows(out)

    # -- the programs -------------------------------------------------------------------------

    def _constrain_hidden(self, h: Hidden) -> Hidden:
        return tuple(self.step.constrain_rows(x) for x in h)

    def _head_logps(self, top: Params, h: Hidden, b: Batch, group: int) -> jax.Array:
        step = self.step
        chunk = step.memory_plan(b).logits_chunk
        return step.constrain_rows(head_rows(step.mdef, top, h, b.completion_tokens_BxT,
                                             step.temperature, group, chunk)[0])

    def _embed(self, top: Params, b: Batch, group: int) -> Hidden:
        return self._constrain_hidden(
            embed_rows(self.step.mdef, top, b.prompt_tokens_BxP, b.completion_tokens_BxT, group))

    def _block(self, trained_l: Params, frozen_l: Params, h: Hidden, b: Batch, sliding: bool,
               group: int, adapters_off: bool = False, dropout: Any = None) -> Hidden:
        step = self.step
        if step.lora:
            params_l = lora.combine(frozen_l, lora.switched_off(trained_l) if adapters_off
                                    else trained_l)
        else:
            params_l = trained_l
        mdef = with_attention_chunk(step.mdef, step.memory_plan(b).attention_chunk)
        key = None
        if dropout is not None:  # (update count, layer)
            count, layer = dropout
            key = step.dropout_key(count, 0, 0, layer)
        return self._constrain_hidden(block_rows(
            mdef, sliding, params_l, h, b.prompt_mask_BxP, b.completion_mask_BxT, group, key))

    def _block_fwd(self, trained_l: Params, frozen_l: Params, h: Hidden, b: Batch,
                   dropout: Any, sliding: bool, group: int) -> tuple[Hidden, Any]:
        # (output, pullback: a pytree of the residuals the backward needs, as few as the
        # checkpointing policy keeps); gradients for the trained params only. dropout: see
        # `__call__`.
        remat = self.step.memory_plan(b).remat
        return jax.vjp(rematerialized(
            lambda p, x: self._block(p, frozen_l, x, b, sliding, group, dropout=dropout),
            remat), trained_l, h)

    def _block_bwd(self, pullback: Any, dh: Hidden) -> tuple[Params, Hidden]:
        g_layer, dh = pullback(dh)
        g_layer = jax.lax.with_sharding_constraint(g_layer, self.step.shardings["layers"][0])
        return g_layer, self._constrain_hidden(dh)

    def _head(self, top: Params, h: Hidden, b: Batch, ref_logps, off_policy,
              group: int) -> tuple[dict[str, jax.Array], Params, Hidden]:
        step, algo = self.step, self.step.algo
        d = {"b": b, "ref": ref_logps,
             "w": aggregation_weights(b.loss_mask, algo.loss_aggregation,
                                      algo.loss_norm_length),
             "old": b.sampler_logps_BxT if algo.old_logprobs == "sampler" else None}

        chunk = step.memory_plan(b).logits_chunk

        def loss_fn(top, h):
            logps, ent = head_rows(step.mdef, top, h, b.completion_tokens_BxT,
                                   step.temperature, group, chunk, algo.entropy_coef > 0)
            return step.loss(logps, ent, d, off_policy)

        if step.lora:  # the embedding and head are frozen: the hidden states' gradient only
            (_, aux), dh = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(top, h)
            g_top = {}
        else:
            (_, aux), (g_top, dh) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                       has_aux=True)(top, h)
        return (jax.lax.with_sharding_constraint(aux, step.submesh.replicated()),
                jax.lax.with_sharding_constraint(g_top, top_params(step.shardings)),
                self._constrain_hidden(dh))

    def _embed_grad(self, g_top: Params, dh: Hidden, b: Batch, group: int) -> Params:
        # g_top (donated) with the embedding lookup's gradient added to the embedding's (the
        # tied head's, or zero): XLA scatters dh into the donated buffer, so no second [V, D]
        # array exists (in `_finish` it would sit beside the optimizer's temporaries).
        step = self.step
        _, embed_pullback = jax.vjp(
            lambda e: embed_rows(step.mdef, {"embed": e}, b.prompt_tokens_BxP,
                                 b.completion_tokens_BxT, group), g_top["embed"])
        (g_embed,) = embed_pullback(dh)
        return {**g_top, "embed": g_top["embed"] + g_embed}

    def _finish(self, state, g_top: Params, g_layers: list[Params], b: Batch,
                aux: dict[str, jax.Array], group: int):
        step = self.step
        step.traces += 1  # Python side effect: runs once per trace, not per call
        params = state["params"]
        grads = {**g_top, "layers": dict(enumerate(g_layers))}
        aux_K = jax.tree.map(lambda x: x[None], aux)
        params, opt_state, aux = step.apply_grads(params, state["opt_state"], grads, aux_K,
                                                  state["step"])
        aux = step.finish_aux(jax.tree.map(lambda x: x[None], aux), jnp.ones((1,), bool), {},
                              b.loss_mask, 1)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, aux
