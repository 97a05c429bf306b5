"""The trainer: owns the policy (and reference) parameters and optimizer state on its mesh.

`Trainer.update(batch)` runs one sharded GRPO update. Params and optimizer state are donated
to it (their old buffers are reused), so callers must not hold on to `trainer.params` across
an update: take what they need (the reshard) before the next one.

One update (GRPO, Shao et al., 2024, Algorithm 1):

    π_ref logprobs (β > 0, KL in the loss)  and  π_old logprobs (see `old_logprobs`)
    for iteration in 1..μ:                       # algorithm.num_iterations
        for minibatch in 1..num_minibatches:     # one optimizer step each
            g = Σ over gradient_accumulation_steps microbatches of ∇ loss(microbatch)
            params <- AdamW(clip_by_global_norm(g))

The microbatch losses use the aggregation weights of their whole minibatch (trainer/loss.py),
so accumulating K microbatches gives exactly the minibatch gradient.

Two ways to run it, with the same values. One optimizer step on one microbatch (μ = 1, one
minibatch, no accumulation: the common GRPO setting) runs as a chain of small programs, one per
piece of the model (`Trainer._layered_update`): a block is compiled once for all the layers of
its kind, and each program's temporaries stay small. Anything else runs as one jitted function
(`Trainer._update_step`), where μ × minibatches is a `lax.scan` (one compiled body, not μ·M
copies) and microbatches are an inner scan.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controller.config import AlgorithmConfig
from trainer.logprobs import token_logprobs_and_entropy
from trainer.loss import KL_ESTIMATORS, aggregation_weights, grpo_loss, truncated_is_weights
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
    param_count,
    param_shardings,
    positions_from_mask,
    rows_share_prompts,
    to_rows,
    top_params,
)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainBatch:
    """One GRPO batch; B = prompts × G rows, P prompt columns (left-padded), T completion."""

    prompt_tokens_BxP: Any
    prompt_mask_BxP: Any
    completion_tokens_BxT: Any
    completion_mask_BxT: Any
    advantages_B: Any
    sampler_logps_BxT: Any  # what the sampler drew each token with (diagnostics, or π_old)
    # Tokens that count in the loss; None: completion_mask_BxT. DAPO's overlong filtering
    # zeroes truncated rows here while their tokens stay visible to attention.
    loss_mask_BxT: Any = None

    @property
    def loss_mask(self) -> Any:
        return self.completion_mask_BxT if self.loss_mask_BxT is None else self.loss_mask_BxT


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
    which the layered update also runs as separate programs.
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


log = logging.getLogger(__name__)

# XLA:CPU puts all of a program's temporaries in one block per device and call: ~144 MB for the
# issue-12 standard job's update as one program. glibc serves a block over 32 MB with a fresh
# mmap and unmaps it on free, so every update faulted the whole block in again (~143k page
# faults, a sixth of its CPU time). Split into heaps of at most this size, the temporaries come
# as blocks glibc keeps and hands out again (its mmap threshold rises to the largest block
# freed, up to 32 MB): the update took 1.03-1.04 s against 1.17-1.18 s. XLA cannot write a
# program with several temp heaps to the persistent compile cache, so the cap is large enough
# that a program whose temporaries glibc reuses anyway (<= 16 MB: the demo's update, 13 MB)
# stays in one heap and is cached; the sampler's programs keep one heap (their temporaries
# are small, the KV cache is a donated argument). The layered update's programs hold one block's
# temporaries each, under the cap on that job, so they too keep one heap and are cached; the cap
# still splits the monolithic update's and a large model's.
CPU_HEAP_LIMIT_BYTES = 16 << 20


def cpu_heap_options(submesh: Any) -> dict[str, Any]:
    """XLA compiler options for the trainer's programs on `submesh` (CPU only; see above)."""
    from jax.sharding import Mesh

    mesh = submesh.mesh  # an AbstractMesh (`tandem plan`) has no devices and compiles nothing
    if not isinstance(mesh, Mesh) or mesh.devices.flat[0].platform != "cpu":
        return {}
    return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_LIMIT_BYTES}

# The smallest model (in parameters) whose update runs as per-layer programs by default (see
# `Trainer._layered_update`). Each program costs a launch on every device (~2 ms on the
# simulated CPU devices, with its collectives); for the default demo model (124k parameters,
# 2 layers, an update of ~50 ms) the ~14 launches made the update ~40% slower, while the
# issue-12 standard job (3.2M parameters, 4 layers) compiles its first update 1.5 s faster
# and runs as fast as before.
LAYERED_MIN_PARAMS = 1_000_000

# The narrowest prompt (in padded columns) for which the trainer's forward runs each group's
# prompt once (see Trainer._group). Measured on the default demo job (prompts padded to 16,
# 124k params), the shared forward made the update 1.4x slower; on the issue-12 standard job
# (32-token prompts, 3.2M params) it is the faster path.
SHARE_MIN_WIDTH = 32

# How each loss aux value combines over microbatches and optimizer steps.
_SUMMED = ("loss/policy", "loss/kl", "loss/entropy", "loss/total")  # Σ over microbatches
_MIN, _MAX = ("ratio/min",), ("ratio/max",)  # everything else: token-count-weighted mean


def _call(fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """Runs one of the layered update's programs (see `Trainer._layered_update`)."""
    return fn(*args, **static)


class Trainer:
    """GRPO updates on the trainer sub-mesh."""

    def __init__(self, mdef: ModelDef, params: Params, optimizer: optax.GradientTransformation,
                 submesh: Any, algo: AlgorithmConfig, temperature: float, *,
                 lr_schedule: optax.Schedule | None = None, is_cap: float = 2.0,
                 prompt_group: int = 1, share_min_width: int = SHARE_MIN_WIDTH,
                 layered: bool | None = None):
        self.mdef = mdef
        self.submesh = submesh
        self.algo = algo
        self.temperature = temperature
        self.lr_schedule = lr_schedule  # for the optim/lr metric only
        self.is_cap = is_cap  # C of the truncated IS weight for stale (async) batches
        # G: rows come G at a time with one prompt each (sampling.share_prompt); see `_group`.
        self.prompt_group = prompt_group
        self.share_min_width = share_min_width
        self.shardings = param_shardings(mdef, submesh)
        params = jax.device_put(params, self.shardings)
        # β = 0 needs no reference model: skip its memory and its forward pass.
        self.ref_params = jax.tree.map(jnp.copy, params) if algo.uses_reference else None
        self.ref_params_host = None
        if self.ref_params is not None and algo.reference_offload:
            # HOST SYNC (once): the reference model moves to host memory, off the devices.
            self.ref_params_host = jax.device_get(self.ref_params)
            self.ref_params = None
        opt_state = optimizer.init(params)  # eager: moments are zeros_like(param), same layout
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        # Moments follow their params' shardings; scalars (step counts) are replicated.
        self.state = jax.tree.map(
            lambda x: x if x.ndim else jax.device_put(x, submesh.replicated()), state)
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self._optimizer = optimizer
        self._compiler_options = cpu_heap_options(submesh)
        if self._compiler_options:
            # Such a program cannot be written to JAX's persistent compile cache; JAX warns
            # about each failed write, which the user cannot act on (see CPU_HEAP_LIMIT_BYTES).
            warnings.filterwarnings(
                "ignore", message=r"Error writing persistent compilation cache entry .*"
                r"Multiple temp buffer allocations found", category=UserWarning)
        # Out shardings pinned to the in shardings: the state never drifts to another layout.
        self._update = jax.jit(self._update_step, donate_argnums=(0,), static_argnames=("group",),
                               out_shardings=(state_shardings, submesh.replicated()),
                               compiler_options=self._compiler_options)
        self._sequence_kl = jax.jit(self._sequence_kl_impl, static_argnames=("group",),
                                    compiler_options=self._compiler_options)
        # The layered update's programs (see `_layered_update`); one compile per kind of layer.
        opts = self._compiler_options
        # None: layered for models of LAYERED_MIN_PARAMS or more (see there).
        self.layered = (param_count(params) >= LAYERED_MIN_PARAMS) if layered is None \
            else layered
        self._head_logps_j = jax.jit(self._head_logps_impl, static_argnames=("group",),
                                     compiler_options=opts)
        self._embed_j = jax.jit(self._embed_impl, static_argnames=("group",),
                                compiler_options=opts)
        self._block_fwd_j = jax.jit(self._block_fwd_impl, static_argnames=("sliding", "group"),
                                    compiler_options=opts)
        self._block_j = jax.jit(self._block_impl, static_argnames=("sliding", "group"),
                                compiler_options=opts)
        self._block_bwd_j = jax.jit(self._block_bwd_impl, compiler_options=opts)
        self._head_j = jax.jit(self._head_impl, static_argnames=("group",), compiler_options=opts)
        self._finish_j = jax.jit(self._finish_impl, donate_argnums=(0,),
                                 static_argnames=("group",),
                                 out_shardings=(state_shardings, submesh.replicated()),
                                 compiler_options=opts)
        # Times the update was traced (each trace is a compile): `_update_step` for the
        # monolithic update, `_finish_impl` (its last program) for the layered one.
        self.update_traces = 0
        self._pretrace_thread: threading.Thread | None = None

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

    @property
    def optimizer_steps_per_update(self) -> int:
        """μ × num_minibatches: optimizer steps taken by one `update`."""
        return self.algo.num_iterations * self.algo.num_minibatches

    def place_batch(self, batch: TrainBatch) -> TrainBatch:
        """Host arrays -> the trainer mesh, rows split over the "batch" rule's axis."""
        def put(x):
            return None if x is None else jax.device_put(np.asarray(x), self._row_sharding(x))
        return jax.tree.map(put, batch, is_leaf=lambda x: x is None)

    def _row_sharding(self, x: Any) -> Any:
        """Where a batch leaf lives: its rows split over the "batch" rule's axis."""
        return self.submesh.batch_sharding(np.shape(x)[0], np.ndim(x))

    def _group(self, batch: TrainBatch) -> int:
        """G for the shared-prompt forward, or 1 (per-row) when the batch is not G-grouped.

        Every microbatch must hold whole groups whose rows carry the same prompt; checked on
        the host (the batch is host data here), so a batch of other rows is still exact.
        Prompts narrower than `share_min_width` columns also take the per-row path: the
        shared forward runs the model twice (prompts, then completions), and for short
        prompts that second pass costs more than the prompt FLOPs it saves.
        """
        g = self.prompt_group
        rows, width = np.shape(batch.prompt_tokens_BxP)
        chunks = self.algo.num_minibatches * self.algo.gradient_accumulation_steps
        if (rows % (chunks * g) or width < self.share_min_width
                or not rows_share_prompts(batch.prompt_tokens_BxP, batch.prompt_mask_BxP, g)):
            return 1
        return g

    def _logprobs_entropy(self, params: Params, b: TrainBatch, group: int = 1
                          ) -> tuple[jax.Array, jax.Array]:
        return sequence_logprobs_and_entropy(
            self.mdef, params, b.prompt_tokens_BxP, b.prompt_mask_BxP, b.completion_tokens_BxT,
            b.completion_mask_BxT, self.temperature, group)

    def _logprobs(self, params: Params, b: TrainBatch, group: int = 1) -> jax.Array:
        return self._logprobs_entropy(params, b, group)[0]

    # -- chunking -----------------------------------------------------------------------------

    def _chunks(self, x: jax.Array, n: int) -> jax.Array:
        """[B, ...] -> [n, B/n, ...]: n consecutive row blocks (groups stay together)."""
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    def _constrain_rows(self, x: jax.Array) -> jax.Array:
        """A chunk's rows split over the trainer's batch axis again, as the full batch was."""
        return jax.lax.with_sharding_constraint(
            x, self.submesh.batch_sharding(x.shape[0], x.ndim))

    def _chunked_logprobs(self, params: Params, b: TrainBatch, n: int, group: int = 1
                          ) -> jax.Array:
        """Logprobs of the whole batch, n row blocks at a time (activation memory of one)."""
        if n == 1:
            return jax.lax.stop_gradient(self._logprobs(params, b, group))
        chunks = jax.tree.map(lambda x: self._chunks(x, n), b)

        def one(c: TrainBatch) -> jax.Array:
            return self._logprobs(params, jax.tree.map(self._constrain_rows, c), group)

        out = jax.lax.map(one, chunks)
        return jax.lax.stop_gradient(out.reshape(b.completion_mask_BxT.shape))

    # -- the update ---------------------------------------------------------------------------

    def _loss(self, logps, ent, d, off_policy) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One microbatch's loss and aux from its logprobs and entropies. `d` holds the
        microbatch ("b"), its aggregation weights ("w"), π_old ("old"; None: sg(π_θ)) and π_ref
        ("ref"; None without a KL term in the loss)."""
        algo = self.algo
        mb: TrainBatch = d["b"]
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
        cm = mb.completion_mask_BxT
        aux["_logp_diff"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logps)
                                            - mb.sampler_logps_BxT) * cm)
        aux["_logp_tokens"] = jnp.sum(cm.astype(jnp.float32))
        return loss, aux

    def _apply_grads(self, params: Params, opt_state: Any, grads: Params,
                     aux_K: dict[str, jax.Array], step_index: jax.Array
                     ) -> tuple[Params, Any, dict[str, jax.Array]]:
        """One optimizer step on summed gradients; aux_K: its microbatches' aux, stacked."""
        aux = _combine(aux_K)
        aux["grad/norm"] = optax.tree.norm(grads)  # before clipping
        if self.lr_schedule is not None:
            aux["optim/lr"] = jnp.asarray(self.lr_schedule(step_index), jnp.float32)
        updates, opt_state = self._optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    def _finish_aux(self, aux_S: dict[str, jax.Array], first_S: jax.Array,
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

    def _update_step(self, state, ref_params, b: TrainBatch, off_policy, group: int = 1):
        self.update_traces += 1  # Python side effect: runs once per trace, not per call
        algo = self.algo
        n_mb, n_acc = algo.num_minibatches, algo.gradient_accumulation_steps
        n_chunks, steps = n_mb * n_acc, algo.num_iterations * n_mb
        loss_mask = b.loss_mask
        aux_pre: dict[str, jax.Array] = {}

        # REFERENCE AND OLD LOGPROBS: fixed for the whole update (no gradient).
        ref_logps = None
        if ref_params is not None and algo.kl_penalty == "loss":
            ref_logps = self._chunked_logprobs(ref_params, b, n_chunks, group)
        if algo.old_logprobs == "sampler":
            old_logps = b.sampler_logps_BxT
        elif algo.num_iterations > 1 or n_mb > 1:
            # π_old = the params before this update; later minibatches/iterations are off-policy.
            old_logps = self._chunked_logprobs(state["params"], b, n_chunks, group)
        else:
            old_logps = None  # μ = 1, one minibatch: π_old = sg(π_θ) in the loss, no extra pass
        if old_logps is not None and algo.old_logprobs == "recompute":
            aux_pre["sampler/logp_abs_diff"] = _masked_mean(
                jnp.abs(old_logps - b.sampler_logps_BxT), b.completion_mask_BxT)

        # Aggregation weights over each *minibatch*, then cut into its microbatches.
        weights = jax.vmap(lambda m: aggregation_weights(m, algo.loss_aggregation,
                                                         algo.loss_norm_length)
                           )(self._chunks(loss_mask, n_mb)).reshape(loss_mask.shape)
        data = {"b": b, "w": weights, "old": old_logps, "ref": ref_logps}
        data = jax.tree.map(lambda x: self._chunks(x, n_chunks), data)

        def loss_fn(params, d):
            return self._loss(*self._logprobs_entropy(params, d["b"], group), d, off_policy)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def opt_step(carry, i):
            params, opt_state = carry
            mb_index = i % n_mb

            def micro(g_acc, k):
                d = jax.tree.map(lambda x: self._constrain_rows(x[mb_index * n_acc + k]), data)
                (_, aux), g = grad_fn(params, d)
                return jax.tree.map(jnp.add, g_acc, g), aux

            if n_acc == 1:  # no accumulation: no scan (and no zero gradient tree to add to)
                d = jax.tree.map(lambda x: self._constrain_rows(x[mb_index]), data)
                (_, aux), grads = grad_fn(params, d)
                aux_K = jax.tree.map(lambda x: x[None], aux)
            else:
                zeros = jax.tree.map(jnp.zeros_like, params)
                grads, aux_K = jax.lax.scan(micro, zeros, jnp.arange(n_acc))
            params, opt_state, aux = self._apply_grads(params, opt_state, grads, aux_K,
                                                       state["step"] * steps + i)
            return (params, opt_state), (aux, i == 0)

        carry = (state["params"], state["opt_state"])
        if steps == 1:  # one optimizer step (the common GRPO setting): no scan around it
            (params, opt_state), (aux, first) = opt_step(carry, 0)
            aux_S, first_S = jax.tree.map(lambda x: jnp.asarray(x)[None], (aux, first))
        else:
            (params, opt_state), (aux_S, first_S) = jax.lax.scan(opt_step, carry,
                                                                 jnp.arange(steps))
        aux = self._finish_aux(aux_S, first_S, aux_pre, loss_mask, steps)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, aux

    # -- the layered update -------------------------------------------------------------------

    def uses_layered_update(self) -> bool:
        """Whether `update` runs as per-layer programs (`_layered_update`): for one optimizer
        step per update on one microbatch, the common GRPO setting, unless the trainer was
        built with layered=False (or, by default, for a model under LAYERED_MIN_PARAMS).
        Everything else (μ > 1, several minibatches, gradient accumulation) runs the
        monolithic `_update_step`."""
        return (self.layered and self.optimizer_steps_per_update == 1
                and self.algo.gradient_accumulation_steps == 1)

    def _layered_update(self, state, ref_params, b: TrainBatch, off_policy, group: int = 1,
                        run: Callable[..., Any] = _call):
        """`_update_step` for one optimizer step on one microbatch, as a chain of programs: the
        reference logprobs; the embedding; each block's forward, which returns its pullback
        (a pytree of the residuals its backward needs); the head and loss with their gradient;
        each block's backward, last block first; the embedding's backward and the optimizer.

        The same values as `_update_step` (up to float rounding: the embedding's two gradient
        terms are summed in another order). Why: XLA compiles a block once however many layers
        share its kind, so the first update compiles ~2 of the model's L blocks' worth of code
        instead of 2·L; and each program's temporaries are a block's, small enough for malloc
        to reuse between calls instead of mapping and faulting in one large buffer per call.
        """
        algo, spec = self.algo, self.mdef.spec
        ref_logps = None
        if ref_params is not None and algo.kl_penalty == "loss":
            ref_logps = self._layered_logprobs(ref_params, b, group, run)
        params = state["params"]
        top = top_params(params)
        h = run(self._embed_j, top, b, group=group)
        pullbacks = []
        for i in range(spec.num_layers):
            h, pullback = run(self._block_fwd_j, params["layers"][i], h, b,
                              sliding=spec.is_sliding(i), group=group)
            pullbacks.append(pullback)
        aux, g_top, dh = run(self._head_j, top, h, b, ref_logps, off_policy, group=group)
        g_layers: list[Any] = [None] * spec.num_layers
        for i in reversed(range(spec.num_layers)):
            g_layers[i], dh = run(self._block_bwd_j, pullbacks.pop(), dh)  # frees residuals
        return run(self._finish_j, state, g_top, g_layers, dh, b, aux, group=group)

    def _layered_logprobs(self, params: Params, b: TrainBatch, group: int,
                          run: Callable[..., Any] = _call) -> jax.Array:
        """Logprobs (no gradient) by the layered update's programs: the embedding, a block's
        forward without the residuals a backward needs, and the head."""
        spec = self.mdef.spec
        h = run(self._embed_j, top_params(params), b, group=group)
        for i in range(spec.num_layers):
            h = run(self._block_j, params["layers"][i], h, b, sliding=spec.is_sliding(i),
                    group=group)
        return run(self._head_logps_j, top_params(params), h, b, group=group)

    def _lower_ahead(self, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """`pretrace`'s runner for `_layered_update`: traces and lowers one program for abstract
        arguments and returns its outputs as abstract values with the shardings the program
        pins them to, so that the next program is traced for exactly the arguments the real
        call passes. A block's backward takes its forward's residuals, whose layout only the
        compiler decides: it is left to the real call (its trace is the cheapest)."""
        def like(tree: Any, sharding: Any) -> Any:
            return jax.tree.map(
                lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), tree, sharding)

        def rows(tree: Any) -> Any:
            return jax.tree.map(lambda o: like(o, self._row_sharding(o)), tree)

        if fn is self._block_bwd_j:
            return like(self.mdef.shapes()["layers"][0], self.shardings["layers"][0]), args[1]
        traced = fn.trace(*args, **static)
        traced.lower()
        out = traced.out_info
        if fn is self._block_fwd_j:
            return rows(out[0]), None
        if fn is self._head_j:
            aux, g_top, dh = out
            return (jax.tree.map(lambda o: like(o, self.submesh.replicated()), aux),
                    like(g_top, top_params(self.shardings)), rows(dh))
        return None if fn is self._finish_j else rows(out)

    def _constrain_hidden(self, h: Hidden) -> Hidden:
        return tuple(self._constrain_rows(x) for x in h)

    def _head_logps_impl(self, top: Params, h: Hidden, b: TrainBatch, group: int
                         ) -> jax.Array:
        return self._constrain_rows(head_rows(self.mdef, top, h, b.completion_tokens_BxT,
                                              self.temperature, group)[0])

    def _embed_impl(self, top: Params, b: TrainBatch, group: int) -> Hidden:
        return self._constrain_hidden(
            embed_rows(self.mdef, top, b.prompt_tokens_BxP, b.completion_tokens_BxT, group))

    def _block_impl(self, params_l: Params, h: Hidden, b: TrainBatch, sliding: bool,
                    group: int) -> Hidden:
        return self._constrain_hidden(block_rows(
            self.mdef, sliding, params_l, h, b.prompt_mask_BxP, b.completion_mask_BxT, group))

    def _block_fwd_impl(self, params_l: Params, h: Hidden, b: TrainBatch, sliding: bool,
                        group: int) -> tuple[Hidden, Any]:
        # (output, pullback: a pytree of the residuals the backward needs)
        return jax.vjp(lambda p, x: self._block_impl(p, x, b, sliding, group), params_l, h)

    def _block_bwd_impl(self, pullback: Any, dh: Hidden) -> tuple[Params, Hidden]:
        g_layer, dh = pullback(dh)
        g_layer = jax.lax.with_sharding_constraint(g_layer, self.shardings["layers"][0])
        return g_layer, self._constrain_hidden(dh)

    def _head_impl(self, top: Params, h: Hidden, b: TrainBatch, ref_logps, off_policy,
                   group: int) -> tuple[dict[str, jax.Array], Params, Hidden]:
        algo = self.algo
        d = {"b": b, "ref": ref_logps,
             "w": aggregation_weights(b.loss_mask, algo.loss_aggregation,
                                      algo.loss_norm_length),
             "old": b.sampler_logps_BxT if algo.old_logprobs == "sampler" else None}

        def loss_fn(top, h):
            logps, ent = head_rows(self.mdef, top, h, b.completion_tokens_BxT,
                                   self.temperature, group)
            return self._loss(logps, ent, d, off_policy)

        (_, aux), (g_top, dh) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(top, h)
        return (jax.lax.with_sharding_constraint(aux, self.submesh.replicated()),
                jax.lax.with_sharding_constraint(g_top, top_params(self.shardings)),
                self._constrain_hidden(dh))

    def _finish_impl(self, state, g_top: Params, g_layers: list[Params], dh: Hidden,
                     b: TrainBatch, aux: dict[str, jax.Array], group: int):
        self.update_traces += 1  # Python side effect: runs once per trace, not per call
        params = state["params"]
        _, embed_pullback = jax.vjp(
            lambda e: embed_rows(self.mdef, {"embed": e}, b.prompt_tokens_BxP,
                                 b.completion_tokens_BxT, group), params["embed"])
        (g_embed,) = embed_pullback(dh)
        grads = {**g_top, "embed": g_top["embed"] + g_embed, "layers": dict(enumerate(g_layers))}
        aux_K = jax.tree.map(lambda x: x[None], aux)
        params, opt_state, aux = self._apply_grads(params, state["opt_state"], grads, aux_K,
                                                   state["step"])
        aux = self._finish_aux(jax.tree.map(lambda x: x[None], aux), jnp.ones((1,), bool), {},
                               b.loss_mask, 1)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, aux

    def update(self, batch: TrainBatch, *, off_policy: bool = False) -> dict[str, jax.Array]:
        """One GRPO update (μ × num_minibatches optimizer steps); device-side metrics.

        off_policy: the batch was sampled by older weights (async schedule); each token's
        advantage is reweighted by the truncated importance ratio w = min(π_θ/μ, C).
        """
        if self._pretrace_thread is not None:  # let it finish: its trace is this call's
            self._pretrace_thread.join()
            self._pretrace_thread = None
        flag = jax.device_put(np.bool_(off_policy), self.submesh.replicated())
        update = self._layered_update if self.uses_layered_update() else self._update
        self.state, aux = update(self.state, self._reference(), self.place_batch(batch), flag,
                                 group=self._group(batch))
        return aux

    def pretrace(self, batch: TrainBatch) -> threading.Thread | None:
        """Traces and lowers the update for `batch`'s shapes on a background thread.

        Tracing the update (Python, ~1 s on the issue-12 job) and lowering it need only the
        batch's shapes, dtypes and the host-side prompt check (`_group`), not its values. The
        loop calls this with a placeholder batch as soon as the first prompts are drawn, so the
        trace runs while the sampler's program compiles (XLA releases the GIL there). JAX keeps
        the jaxpr and the lowering in its caches, keyed by exactly these abstract arguments, so
        the first `update` with the same shapes only compiles. The layered update's programs
        are traced in turn, each for the outputs of the one before (`_lower_ahead`). A batch
        of other shapes traces as usual; a failure here is logged and leaves `update` to trace
        by itself. Returns the thread (None if one is already running); `update` waits for it.
        """
        if self._pretrace_thread is not None:
            return None
        group = self._group(batch)

        def abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding)

        b = jax.tree.map(lambda x: abstract(x, self._row_sharding(x)), batch)
        ref = self.ref_params
        if self.ref_params_host is not None:  # offloaded: trace without copying it in
            ref = jax.tree.map(abstract, self.ref_params_host, self.shardings)
        flag = abstract(np.bool_(False), self.submesh.replicated())
        state = self.state

        def run() -> None:
            try:
                if self.uses_layered_update():
                    self._layered_update(state, ref, b, flag, group, run=self._lower_ahead)
                else:
                    self._update.trace(state, ref, b, flag, group=group).lower()
            except Exception as e:  # an optimisation only: update() traces for itself
                log.warning("tracing the update ahead of the first batch failed (%s: %s); "
                            "the first update traces it instead", type(e).__name__, e)

        # Not a daemon: a process that exits mid-trace (a failed first rollout) waits the
        # second or two for it rather than tearing down the interpreter under a lowering.
        self._pretrace_thread = threading.Thread(target=run, name="tandem-pretrace")
        self._pretrace_thread.start()
        return self._pretrace_thread

    def logprobs(self, batch: TrainBatch) -> jax.Array:
        """Per-token logprobs of the batch's completions under the current params."""
        fn = jax.jit(self._logprobs, static_argnums=2, compiler_options=self._compiler_options)
        return fn(self.params, self.place_batch(batch), self._group(batch))

    def _sequence_kl_impl(self, params, ref_params, b: TrainBatch, group: int = 1) -> jax.Array:
        n = self.algo.num_minibatches * self.algo.gradient_accumulation_steps
        logps = self._chunked_logprobs(params, b, n, group)
        ref = self._chunked_logprobs(ref_params, b, n, group)
        on = b.loss_mask.astype(bool)
        kl = KL_ESTIMATORS[self.algo.kl_estimator](logps, jnp.where(on, ref, logps))
        return jnp.sum(jnp.where(on, kl, 0.0), axis=-1)

    def sequence_kl(self, batch: TrainBatch) -> jax.Array:
        """Σ_t KL_t(π_θ || π_ref) per row with `algorithm.kl_estimator` (for KL in the reward).

        Device array [B]; the caller syncs. Needs the reference model (β > 0).
        """
        if self.ref_params is None and self.ref_params_host is None:
            raise RuntimeError("sequence_kl needs the reference model, which exists only when "
                               "algorithm.beta > 0 (fix: e.g. algorithm.beta=0.02)")
        return self._sequence_kl(self.params, self._reference(), self.place_batch(batch),
                                 group=self._group(batch))

    def _reference(self) -> Params | None:
        """The reference params on the trainer mesh (copied in from the host when offloaded;
        the copy is freed after the step that uses it)."""
        if self.ref_params_host is not None:
            return jax.device_put(self.ref_params_host, self.shardings)
        return self.ref_params


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
