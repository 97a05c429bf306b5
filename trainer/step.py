"""The jitted GRPO update step: `UpdateStep.update(state, ref_params, batch, off_policy)`.

`ref_params` is the frozen half of the model: the reference model's params (None without a
KL term), or under LoRA the base, which the adapters in the state are applied to and which is
the reference model with the adapters switched off.

One update (GRPO, Shao et al., 2024, Algorithm 1):

    π_ref logprobs (β > 0, KL in the loss)  and  π_old logprobs (see `old_logprobs`)
    for iteration in 1..μ:                       # algorithm.num_iterations
        for minibatch in 1..num_minibatches:     # one optimizer step each
            g = Σ over gradient_accumulation_steps microbatches of ∇ loss(microbatch)
            params <- AdamW(clip_by_global_norm(g))

The microbatch losses use the aggregation weights of their whole minibatch (trainer/loss.py),
so accumulating K microbatches gives exactly the minibatch gradient.

`update` runs all of it as one jitted function, sharded on the trainer mesh, with the state
donated: μ × minibatches is a `lax.scan` (one compiled body, not μ·M copies) and microbatches
are an inner scan. trainer/layered.py runs the common case (one optimizer step on one
microbatch) as a chain of per-layer programs instead, with the loss, optimizer step and metrics
defined here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controller.config import AlgorithmConfig, TrainerConfig
from trainer import lora
from trainer.logprobs import sequence_logprobs_and_entropy
from trainer.loss import KL_ESTIMATORS, aggregation_weights, grpo_loss, truncated_is_weights
from trainer.memory import MemoryPlan, plan_memory
from trainer.model import ModelDef, Params, lora_dropout_key

# The batch the programs take: a `trainer.trainer.TrainBatch` on the trainer mesh (its rows
# split over the "batch" rule's axis). Typed Any: trainer.trainer imports this module.
Batch = Any

# How each loss aux value combines over microbatches and optimizer steps.
_SUMMED = ("loss/policy", "loss/kl", "loss/entropy", "loss/total")  # Σ over microbatches
_MIN, _MAX = ("ratio/min",), ("ratio/max",)  # everything else: token-count-weighted mean


class UpdateStep:
    """The GRPO update's programs on the trainer mesh: the update, the sequence KL, and the
    logprobs, loss, optimizer step and metrics they are built from. Holds no state: the
    `Trainer` owns the params and optimizer state and passes them in."""

    def __init__(self, mdef: ModelDef, shardings: Params, optimizer: optax.GradientTransformation,
                 submesh: Any, algo: AlgorithmConfig, temperature: float, *,
                 lr_schedule: optax.Schedule | None, is_cap: float, state_shardings: Any,
                 compiler_options: dict[str, Any], memory: TrainerConfig | None = None,
                 device_bytes: int | None = None, lora: bool = False, seed: int = 0):
        self.mdef = mdef
        self.shardings = shardings  # the params' shardings on the trainer mesh
        self.optimizer = optimizer
        self.submesh = submesh
        self.algo = algo
        self.temperature = temperature
        self.lr_schedule = lr_schedule  # for the optim/lr metric only
        self.is_cap = is_cap  # C of the truncated IS weight for stale (async) batches
        self.state_shardings = state_shardings
        self.compiler_options = compiler_options
        # trainer.logits_chunk, remat, attention_chunk; "automatic" is decided from the shapes
        # and device_bytes (`memory_plan`).
        self.memory = memory or TrainerConfig(remat="none")
        self.device_bytes = device_bytes  # what one trainer device holds, if known
        # LoRA (trainer/lora.py): the state's params are the adapters, and the programs' frozen
        # argument (`ref_params`) is the base, which is also the reference model.
        self.lora = lora
        self.seed = seed  # LoRA dropout's masks come from this seed and the update's count
        # Times the update was traced (each trace is a compile): `update_step` for this
        # update, its last program for the layered one.
        self.traces = 0
        # Out shardings pinned to the in shardings: the state never drifts to another layout.
        self.update = jax.jit(self.update_step, donate_argnums=(0,), static_argnames=("group",),
                              out_shardings=(state_shardings, submesh.replicated()),
                              compiler_options=compiler_options)
        self.sequence_kl = jax.jit(self.sequence_kl_rows, static_argnames=("group",),
                                   compiler_options=compiler_options)
        self.policy_logprobs = jax.jit(self.policy_logprobs_rows, static_argnames=("group",),
                                       compiler_options=compiler_options)

    # -- rows and chunks ----------------------------------------------------------------------

    def row_sharding(self, x: Any) -> Any:
        """Where a batch leaf lives: its rows split over the "batch" rule's axis."""
        return self.submesh.batch_sharding(np.shape(x)[0], np.ndim(x))

    def constrain_rows(self, x: jax.Array) -> jax.Array:
        """A chunk's rows split over the trainer's batch axis again, as the full batch was."""
        return jax.lax.with_sharding_constraint(
            x, self.submesh.batch_sharding(x.shape[0], x.ndim))

    @staticmethod
    def chunks(x: jax.Array, n: int) -> jax.Array:
        """[B, ...] -> [n, B/n, ...]: n consecutive row blocks (groups stay together)."""
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    # -- logprobs -----------------------------------------------------------------------------

    def rows_per_device(self, rows: int) -> int:
        """How many of `rows` batch rows one trainer device holds."""
        return self.submesh.batch_sharding(rows, 1).shard_shape((rows,))[0]

    def memory_plan(self, b: Batch, rows_per_device: int | None = None) -> MemoryPlan:
        """The head's chunk, the checkpointing policy and the attention chunk for a batch of
        b's shapes: the config's choices, "automatic" decided by trainer/memory.py.
        rows_per_device: b's rows are already one device's share (estimates); None: b is a
        sharded (micro)batch."""
        rows, t = b.completion_tokens_BxT.shape
        local = self.rows_per_device(rows) if rows_per_device is None else rows_per_device
        return plan_memory(self.mdef.spec, local, b.prompt_tokens_BxP.shape[1], t,
                           logits=self.memory.logits_chunk, remat=self.memory.remat,
                           attention=self.memory.attention_chunk,
                           device_bytes=self.device_bytes)

    def policy(self, params: Params, frozen: Params | None) -> Params:
        """The policy's whole params tree: the trained params, with the frozen base under
        LoRA."""
        return lora.combine(frozen, params) if self.lora else params

    def reference(self, params: Params, frozen: Params | None) -> Params | None:
        """The reference model's params: the frozen copy, or under LoRA the base with the
        adapters switched off (zero adapters: the base's forward exactly, no second copy)."""
        return lora.combine(frozen, lora.switched_off(params)) if self.lora else frozen

    def trained_shapes(self) -> Params:
        """Shapes of the params the update trains (the adapters under LoRA)."""
        shapes = self.mdef.shapes()
        return lora.split(shapes)[1] if self.lora else shapes

    def kl_in_loss(self, frozen: Params | None) -> bool:
        return (self.algo.kl_penalty == "loss" and self.algo.uses_reference
                and (self.lora or frozen is not None))

    def logprobs_entropy(self, params: Params, b: Batch, group: int = 1,
                         dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(log π, entropy of π) at every completion position of the batch, one forward;
        with LoRA dropout when given a key (`dropout_key`)."""
        plan = self.memory_plan(b)
        return sequence_logprobs_and_entropy(
            self.mdef, params, b.prompt_tokens_BxP, b.prompt_mask_BxP, b.completion_tokens_BxT,
            b.completion_mask_BxT, self.temperature, group, chunk=plan.logits_chunk,
            remat=plan.remat, attention_chunk=plan.attention_chunk,
            entropy_grad=self.algo.entropy_coef > 0, dropout_key=dropout_key)

    @property
    def dropout(self) -> bool:
        """Whether the update's policy forwards drop the adapters' inputs (LoRA dropout)."""
        return self.lora and self.mdef.spec.lora_dropout > 0

    def dropout_key(self, count: jax.Array, *path: Any) -> jax.Array | None:
        """The LoRA dropout key of update number `count` (the state's "step"), folded with
        `path` (optimizer step, microbatch, then layer for one block's key): a pure function
        of the run's seed and the update, so a resumed run draws the masks it would have drawn.
        None without dropout."""
        if not self.dropout:
            return None
        return lora_dropout_key(jax.random.fold_in(jax.random.key(self.seed), count), *path)

    def policy_logprobs_rows(self, params: Params, frozen: Params | None, b: Batch,
                             group: int = 1) -> jax.Array:
        """log π at every completion position, for the trained params and the frozen half
        (`policy_logprobs` is this, jitted)."""
        return self.logprobs(self.policy(params, frozen), b, group)

    def logprobs(self, params: Params, b: Batch, group: int = 1) -> jax.Array:
        """log π at every completion position of the batch, one forward."""
        return self.logprobs_entropy(params, b, group)[0]

    def chunked_logprobs(self, params: Params, b: Batch, n: int, group: int = 1
                         ) -> jax.Array:
        """Logprobs of the whole batch, n row blocks at a time (activation memory of one)."""
        if n == 1:
            return jax.lax.stop_gradient(self.logprobs(params, b, group))
        chunks = jax.tree.map(lambda x: self.chunks(x, n), b)

        def one(c: Batch) -> jax.Array:
            return self.logprobs(params, jax.tree.map(self.constrain_rows, c), group)

        out = jax.lax.map(one, chunks)
        return jax.lax.stop_gradient(out.reshape(b.completion_mask_BxT.shape))

    def sequence_kl_rows(self, params, ref_params, b: Batch, group: int = 1) -> jax.Array:
        """Σ_t KL_t(π_θ || π_ref) per row (`sequence_kl` is this, jitted)."""
        n = self.algo.num_minibatches * self.algo.gradient_accumulation_steps
        logps = self.chunked_logprobs(self.policy(params, ref_params), b, n, group)
        ref = self.chunked_logprobs(self.reference(params, ref_params), b, n, group)
        on = b.loss_mask.astype(bool)
        kl = KL_ESTIMATORS[self.algo.kl_estimator](logps, jnp.where(on, ref, logps))
        return jnp.sum(jnp.where(on, kl, 0.0), axis=-1)

    # -- loss, optimizer step, metrics --------------------------------------------------------

    def loss(self, logps, ent, d, off_policy) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One microbatch's loss and aux from its logprobs and entropies. `d` holds the
        microbatch ("b"), its aggregation weights ("w"), π_old ("old"; None: sg(π_θ)) and π_ref
        ("ref"; None without a KL term in the loss)."""
        algo = self.algo
        mb: Batch = d["b"]
        if algo.entropy_coef == 0:
            ent = jax.lax.stop_gradient(ent)  # metric only: skip its backward pass
        # μ = 1, one minibatch: the batch came from the current policy, so π_old = sg(π_θ);
        # the ratio is exactly 1 in value and its gradient is the policy gradient.
        old = jax.lax.stop_gradient(logps) if d["old"] is None else d["old"]
        # A stale batch (async schedule) is reweighted per token by w = min(π_θ/μ, C)
        # against the behaviour logprobs; on-policy batches use w = 1 exactly.
        w_is = jnp.where(off_policy, truncated_is_weights(logps, mb.sampler_logps_BxT,
                                                          self.is_cap), 1.0)
        loss, aux = grpo_loss(
            logps, old, d["ref"], mb.advantages_B[:, None] * w_is, mb.loss_mask,
            epsilon=algo.epsilon, epsilon_low=algo.epsilon_low,
            epsilon_high=algo.epsilon_high, dual_clip_c=algo.dual_clip_c, beta=algo.beta,
            kl_estimator=algo.kl_estimator, aggregation=algo.loss_aggregation,
            norm_length=algo.loss_norm_length,
            importance_sampling_level=algo.importance_sampling_level,
            entropy_BxT=ent, entropy_coef=algo.entropy_coef, weights_BxT=d["w"])
        aux["loss/total"] = loss
        aux["policy/is_weight_mean"] = _masked_mean(w_is, mb.loss_mask)
        aux["_tokens"] = jnp.sum(mb.loss_mask.astype(jnp.float32))
        cm = mb.sampled_mask  # the drawn tokens: only they have a behaviour logprob
        aux["_logp_diff"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logps)
                                            - mb.sampler_logps_BxT) * cm)
        aux["_logp_tokens"] = jnp.sum(cm.astype(jnp.float32))
        return loss, aux

    def apply_grads(self, params: Params, opt_state: Any, grads: Params,
                    aux_K: dict[str, jax.Array], step_index: jax.Array
                    ) -> tuple[Params, Any, dict[str, jax.Array]]:
        """One optimizer step on summed gradients; aux_K: its microbatches' aux, stacked."""
        aux = _combine(aux_K)
        aux["grad/norm"] = optax.tree.norm(grads)  # before clipping
        if self.lr_schedule is not None:
            aux["optim/lr"] = jnp.asarray(self.lr_schedule(step_index), jnp.float32)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    def finish_aux(self, aux_S: dict[str, jax.Array], first_S: jax.Array,
                   aux_pre: dict[str, jax.Array], loss_mask: jax.Array, steps: int
                   ) -> dict[str, jax.Array]:
        """The update's metrics from its optimizer steps' aux (leading axis S)."""
        aux = _combine(aux_S)
        for k in ("grad/norm", "optim/lr", *_SUMMED):  # per optimizer step: mean, not sum
            if k in aux:
                aux[k] = aux[k] / steps
        # Trainer and sampler score the same tokens with the same weights: a gap here means a
        # stale or wrongly loaded sampler (it should be float rounding only). Without a
        # recompute pass, only the first optimizer step's logprobs are pre-update.
        if "sampler/logp_abs_diff" not in aux_pre:
            f = first_S.astype(jnp.float32)
            aux_pre["sampler/logp_abs_diff"] = (
                jnp.sum(aux_S["_logp_diff"] * f)
                / jnp.maximum(jnp.sum(aux_S["_logp_tokens"] * f), 1.0))
        # No loss tokens at all (e.g. every row overlong-filtered): the update is a no-op for
        # the surrogate; report neutral ratio bounds instead of ±inf.
        has_tokens = jnp.sum(aux_S["_tokens"]) > 0
        for k in (*_MIN, *_MAX):
            aux[k] = jnp.where(has_tokens, aux[k], 1.0)
        aux["loss/tokens"] = jnp.sum(loss_mask.astype(jnp.float32))
        for k in ("_tokens", "_logp_diff", "_logp_tokens"):
            aux.pop(k, None)
        aux.update(aux_pre)
        aux["optim/steps"] = jnp.asarray(steps, jnp.float32)
        return aux

    # -- the update ---------------------------------------------------------------------------

    def update_step(self, state, ref_params, b: Batch, off_policy, group: int = 1):
        """One GRPO update (μ × num_minibatches optimizer steps) -> (new state, metrics);
        `update` is this, jitted with the state donated. group: G of the shared-prompt
        forward, or 1 (see `Trainer._group`)."""
        self.traces += 1  # Python side effect: runs once per trace, not per call
        algo = self.algo
        n_mb, n_acc = algo.num_minibatches, algo.gradient_accumulation_steps
        n_chunks, steps = n_mb * n_acc, algo.num_iterations * n_mb
        loss_mask = b.loss_mask
        aux_pre: dict[str, jax.Array] = {}

        # REFERENCE AND OLD LOGPROBS: fixed for the whole update (no gradient).
        ref_logps = None
        if self.kl_in_loss(ref_params):
            ref_logps = self.chunked_logprobs(self.reference(state["params"], ref_params), b,
                                              n_chunks, group)
        if algo.old_logprobs == "sampler":
            old_logps = b.sampler_logps_BxT
        elif algo.num_iterations > 1 or n_mb > 1:
            # π_old = the params before this update; later minibatches/iterations are off-policy.
            old_logps = self.chunked_logprobs(self.policy(state["params"], ref_params), b,
                                              n_chunks, group)
        else:
            old_logps = None  # μ = 1, one minibatch: π_old = sg(π_θ) in the loss, no extra pass
        if old_logps is not None and algo.old_logprobs == "recompute":
            aux_pre["sampler/logp_abs_diff"] = _masked_mean(
                jnp.abs(old_logps - b.sampler_logps_BxT), b.sampled_mask)

        # Aggregation weights over each *minibatch*, then cut into its microbatches.
        weights = jax.vmap(lambda m: aggregation_weights(m, algo.loss_aggregation,
                                                         algo.loss_norm_length)
                           )(self.chunks(loss_mask, n_mb)).reshape(loss_mask.shape)
        data = {"b": b, "w": weights, "old": old_logps, "ref": ref_logps}
        data = jax.tree.map(lambda x: self.chunks(x, n_chunks), data)

        def loss_fn(params, d, key):
            return self.loss(*self.logprobs_entropy(self.policy(params, ref_params), d["b"],
                                                    group, key), d, off_policy)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        # UPDATE: μ × minibatches optimizer steps, each over its microbatches.
        def opt_step(carry, i):
            params, opt_state = carry
            mb_index = i % n_mb

            def micro(g_acc, k):
                d = jax.tree.map(lambda x: self.constrain_rows(x[mb_index * n_acc + k]), data)
                (_, aux), g = grad_fn(params, d, self.dropout_key(state["step"], i, k))
                return jax.tree.map(jnp.add, g_acc, g), aux

            if n_acc == 1:  # no accumulation: no scan (and no zero gradient tree to add to)
                d = jax.tree.map(lambda x: self.constrain_rows(x[mb_index]), data)
                (_, aux), grads = grad_fn(params, d, self.dropout_key(state["step"], i, 0))
                aux_K = jax.tree.map(lambda x: x[None], aux)
            else:
                zeros = jax.tree.map(jnp.zeros_like, params)
                grads, aux_K = jax.lax.scan(micro, zeros, jnp.arange(n_acc))
            params, opt_state, aux = self.apply_grads(params, opt_state, grads, aux_K,
                                                      state["step"] * steps + i)
            return (params, opt_state), (aux, i == 0)

        carry = (state["params"], state["opt_state"])
        if steps == 1:  # one optimizer step (the common GRPO setting): no scan around it
            (params, opt_state), (aux, first) = opt_step(carry, 0)
            aux_S, first_S = jax.tree.map(lambda x: jnp.asarray(x)[None], (aux, first))
        else:
            (params, opt_state), (aux_S, first_S) = jax.lax.scan(opt_step, carry,
                                                                 jnp.arange(steps))
        aux = self.finish_aux(aux_S, first_S, aux_pre, loss_mask, steps)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, aux


def _masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    m = mask_BxT.astype(jnp.float32)
    return jnp.sum(x_BxT * m) / jnp.maximum(jnp.sum(m), 1.0)


def _combine(aux_N: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-chunk aux (leading axis N) -> one dict: sums, min/max, token-weighted means."""
    n_N = aux_N["_tokens"]
    total = jnp.maximum(jnp.sum(n_N), 1.0)
    out = {}
    for k, v in aux_N.items():
        if k in _SUMMED or k.startswith("_"):
            out[k] = jnp.sum(v, axis=0)
        elif k in _MIN:
            out[k] = jnp.min(v, axis=0)
        elif k in _MAX:
            out[k] = jnp.max(v, axis=0)
        elif k in ("grad/norm", "optim/lr"):
            out[k] = jnp.sum(v, axis=0)  # divided by the step count by the caller
        else:
            out[k] = jnp.sum(v * n_N, axis=0) / total
    return out
