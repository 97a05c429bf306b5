"""The trainer: owns the policy (and reference) parameters and optimizer state on its mesh.

`Trainer.update(batch)` runs one jitted, sharded GRPO step. Params and optimizer state are
donated to the step (their old buffers are reused), so callers must not hold on to
`trainer.params` across an update: take what they need (the reshard) before the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controller.config import AlgorithmConfig
from trainer.logprobs import token_logprobs
from trainer.loss import grpo_loss, truncated_is_weights
from trainer.model import ModelDef, Params, apply_model, causal_mask, positions_from_mask


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainBatch:
    """One GRPO batch; B = prompts × G rows, P prompt columns (left-padded), T completion."""

    prompt_tokens_BxP: Any
    prompt_mask_BxP: Any
    completion_tokens_BxT: Any
    completion_mask_BxT: Any
    advantages_B: Any
    sampler_logps_BxT: Any  # what the sampler drew each token with (for diagnostics)


def sequence_logprobs(mdef: ModelDef, params: Params, prompt_BxP, prompt_mask_BxP,
                      completion_BxT, completion_mask_BxT, temperature: float) -> jax.Array:
    """log π(completion token | prefix) for each completion position, by one full forward."""
    tokens_BxL = jnp.concatenate([prompt_BxP, completion_BxT], axis=1)
    mask_BxL = jnp.concatenate([prompt_mask_BxP, completion_mask_BxT], axis=1).astype(bool)
    p, length = prompt_BxP.shape[1], tokens_BxL.shape[1]
    logits_BxLxV, _ = apply_model(mdef, params, tokens_BxL, positions_from_mask(mask_BxL),
                                  causal_mask(mask_BxL, 0, length))
    # The logits at column j predict the token at column j + 1.
    return token_logprobs(logits_BxLxV[:, p - 1 : length - 1], completion_BxT, temperature)


class Trainer:
    """GRPO updates on the trainer sub-mesh."""

    def __init__(self, mdef: ModelDef, params: Params, optimizer: optax.GradientTransformation,
                 submesh: Any, algo: AlgorithmConfig, temperature: float,
                 is_cap: float = 2.0):
        self.mdef = mdef
        self.submesh = submesh
        self.algo = algo
        self.temperature = temperature
        self.is_cap = is_cap
        self.shardings = jax.tree.map(
            lambda axes, shape: submesh.sharding(axes, shape.shape),
            mdef.logical_axes, mdef.shapes(), is_leaf=lambda x: isinstance(x, tuple),
        )
        params = jax.device_put(params, self.shardings)
        # β = 0 needs no reference model: skip its memory and its forward pass.
        self.ref_params = jax.tree.map(jnp.copy, params) if algo.beta > 0 else None
        opt_state = optimizer.init(params)  # eager: moments are zeros_like(param), same layout
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        # Moments follow their params' shardings; scalars (step counts) are replicated.
        self.state = jax.tree.map(
            lambda x: x if x.ndim else jax.device_put(x, submesh.replicated()), state)
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self._optimizer = optimizer
        # Out shardings pinned to the in shardings: the state never drifts to another layout.
        self._update = jax.jit(self._update_step, donate_argnums=(0,),
                               out_shardings=(state_shardings, submesh.replicated()))

    def restore_state(self, state: dict[str, Any]) -> None:
        """Takes a state restored from a checkpoint (same tree, shardings on this mesh)."""
        if jax.tree.structure(state) != jax.tree.structure(self.state):
            raise ValueError("checkpoint state does not match the trainer's state tree")
        self.state = state

    @property
    def params(self) -> Params:
        return self.state["params"]

    @property
    def step(self) -> int:
        return int(self.state["step"])  # host sync

    def place_batch(self, batch: TrainBatch) -> TrainBatch:
        """Host arrays -> the trainer mesh, rows split over the "batch" rule's axis."""
        def put(x):
            x = np.asarray(x)
            return jax.device_put(x, self.submesh.batch_sharding(x.shape[0], x.ndim))
        return TrainBatch(*(put(x) for x in (
            batch.prompt_tokens_BxP, batch.prompt_mask_BxP, batch.completion_tokens_BxT,
            batch.completion_mask_BxT, batch.advantages_B, batch.sampler_logps_BxT)))

    def _logprobs(self, params: Params, b: TrainBatch) -> jax.Array:
        return sequence_logprobs(self.mdef, params, b.prompt_tokens_BxP, b.prompt_mask_BxP,
                                 b.completion_tokens_BxT, b.completion_mask_BxT, self.temperature)

    def _update_step(self, state, ref_params, b: TrainBatch, off_policy):
        algo = self.algo
        ref_logps = None
        if ref_params is not None:
            ref_logps = jax.lax.stop_gradient(self._logprobs(ref_params, b))

        def loss_fn(params):
            logps = self._logprobs(params, b)
            # μ = 1: the batch was sampled from the current policy, so π_old = π_θ (detached)
            # and the ratio is exactly 1 in value; its gradient is the policy gradient.
            old = jax.lax.stop_gradient(logps)
            # A stale batch (async schedule) is reweighted by w = min(π_θ/μ, C) per token;
            # on-policy batches use w = 1 exactly.
            w = jnp.where(off_policy, truncated_is_weights(logps, b.sampler_logps_BxT,
                                                           self.is_cap), 1.0)
            adv_BxT = b.advantages_B[:, None] * w
            loss, aux = grpo_loss(logps, old, ref_logps, adv_BxT, b.completion_mask_BxT,
                                  epsilon=algo.epsilon, beta=algo.beta,
                                  aggregation=algo.loss_aggregation)
            aux["policy/is_weight_mean"] = jax.lax.stop_gradient(
                jnp.sum(w * b.completion_mask_BxT) / jnp.maximum(jnp.sum(b.completion_mask_BxT), 1))
            return loss, {**aux, "_logps": logps}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        # Trainer and sampler score the same tokens with the same weights: a gap here means a
        # stale or wrongly loaded sampler (it should be float rounding only).
        logps = jax.lax.stop_gradient(aux.pop("_logps"))
        m = b.completion_mask_BxT.astype(jnp.float32)
        aux["sampler/logp_abs_diff"] = (
            jnp.sum(jnp.abs(logps - b.sampler_logps_BxT) * m) / jnp.maximum(jnp.sum(m), 1.0))
        updates, opt_state = self._optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        aux["loss/total"] = loss
        aux["grad/norm"] = optax.tree.norm(grads)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, aux

    def update(self, batch: TrainBatch, *, off_policy: bool = False) -> dict[str, jax.Array]:
        """One optimizer step; returns device-side metrics (no host sync here).

        off_policy: the batch was sampled by older weights; apply the truncated IS correction.
        """
        flag = jax.device_put(np.bool_(off_policy), self.submesh.replicated())
        self.state, aux = self._update(self.state, self.ref_params, self.place_batch(batch),
                                       flag)
        return aux

    def logprobs(self, batch: TrainBatch) -> jax.Array:
        """Per-token logprobs of the batch's completions under the current params."""
        return jax.jit(self._logprobs)(self.params, self.place_batch(batch))
