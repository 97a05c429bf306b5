"""The trainer: owns the policy (and reference) parameters and optimizer state on its mesh.

`Trainer.update(batch)` runs one sharded GRPO update (μ × num_minibatches optimizer steps; see
trainer/step.py). Params and optimizer state are donated to it (their old buffers are reused),
so callers must not hold on to `trainer.params` across an update: take what they need (the
reshard) before the next one.

Two ways to run an update, with the same values. One optimizer step on one microbatch (μ = 1,
one minibatch, no accumulation: the common GRPO setting) runs as a chain of small programs, one
per piece of the model (trainer/layered.py). Anything else runs as one jitted function
(`UpdateStep.update`, trainer/step.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from controller.config import AlgorithmConfig, TrainerConfig
from reshard.plan import per_device_bytes
from trainer import lora
from trainer.cpu_heap import cpu_heap_options, ignore_cache_write_warnings
from trainer.layered import LAYERED_MIN_PARAMS, LayeredUpdate
from trainer.memory import UpdateMemory, device_memory_bytes, estimate_update
from trainer.model import ModelDef, Params, param_count, param_shardings
from trainer.step import UpdateStep

log = logging.getLogger(__name__)

# The narrowest prompt (in padded columns) for which the trainer's forward runs each group's
# prompt once (see `Trainer._group`). Sharing divides the prompt's FLOPs by G, but runs the
# model as two passes (the prompts into a KV cache, then the completions against it), each with
# its own per-layer overheads and the cache broadcast to every row; below this width the
# prompt FLOPs saved are fewer than that second pass costs.
SHARE_MIN_WIDTH = 32


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
    # Tokens the sampler drew, where sampler_logps_BxT is a logprob; None: completion_mask_BxT.
    # A multi-turn row's observation tokens are attended but were not drawn by the policy.
    sampled_mask_BxT: Any = None
    # Rows come in consecutive groups of `group` rows that share one prompt (decided by
    # whoever built the batch; 1 makes no such claim). Static metadata, not an array: it is
    # part of the batch's tree structure, so it survives `jax.tree.map` and slicing and is a
    # compile-time constant under `jax.jit`.
    group: int = field(default=1, kw_only=True, metadata={"static": True})

    @property
    def loss_mask(self) -> Any:
        return self.completion_mask_BxT if self.loss_mask_BxT is None else self.loss_mask_BxT

    @property
    def sampled_mask(self) -> Any:
        return (self.completion_mask_BxT if self.sampled_mask_BxT is None
                else self.sampled_mask_BxT)


class Trainer:
    """GRPO updates on the trainer sub-mesh."""

    def __init__(self, mdef: ModelDef, params: Params, optimizer: optax.GradientTransformation,
                 submesh: Any, algo: AlgorithmConfig, temperature: float, *,
                 lr_schedule: optax.Schedule | None = None, is_cap: float = 2.0,
                 share_min_width: int = SHARE_MIN_WIDTH, layered: bool | None = None,
                 memory: TrainerConfig | None = None, adapters: Params | None = None,
                 seed: int = 0):
        self.mdef = mdef
        self.submesh = submesh
        self.algo = algo
        self.share_min_width = share_min_width  # see SHARE_MIN_WIDTH and `_group`
        # LoRA: `params` is the frozen base, `adapters` what the update trains (trainer/lora.py);
        # the reference model is the base with the adapters switched off.
        self.lora = adapters is not None
        self.base: Params | None = None
        self.base_shardings: Params | None = None
        if self.lora:
            self.base_shardings, self.shardings = lora.split(param_shardings(mdef, submesh))
            self.base = jax.device_put(params, self.base_shardings)
            params = jax.device_put(adapters, self.shardings)
        else:
            self.shardings = param_shardings(mdef, submesh)
            params = jax.device_put(params, self.shardings)
        # β = 0 needs no reference model: skip its memory and its forward pass.
        self.ref_params = (jax.tree.map(jnp.copy, params)
                           if algo.uses_reference and not self.lora else None)
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
        memory = memory or TrainerConfig()
        first = submesh.mesh.devices.flat[0]
        # CPU devices of one process share the host's memory.
        self.device_bytes = device_memory_bytes(
            first, len(jax.local_devices(backend="cpu")) if first.platform == "cpu" else 1)
        self._checked_shapes: set[tuple[int, ...]] = set()
        self._compiler_options = cpu_heap_options(submesh)
        if self._compiler_options:
            ignore_cache_write_warnings()
        # The programs: the one-program update and the sequence KL, and the layered update's.
        self._update_step = UpdateStep(
            mdef, self.shardings, optimizer, submesh, algo, temperature,
            lr_schedule=lr_schedule, is_cap=is_cap,
            state_shardings=jax.tree.map(lambda x: x.sharding, self.state),
            compiler_options=self._compiler_options, memory=memory,
            device_bytes=self.device_bytes, lora=self.lora, seed=seed)
        self._layered_update = LayeredUpdate(self._update_step)
        # None: layered for models of LAYERED_MIN_PARAMS or more (see there).
        size = param_count(params) + (param_count(self.base) if self.lora else 0)
        self.layered = (size >= LAYERED_MIN_PARAMS) if layered is None else layered
        self._pretrace_thread: threading.Thread | None = None

    def restore_state(self, state: dict[str, Any]) -> None:
        """Takes a state restored from a checkpoint (same tree, shardings on this mesh)."""
        if jax.tree.structure(state) != jax.tree.structure(self.state):
            raise ValueError("checkpoint state does not match the trainer's state tree")
        self.state = state

    @property
    def params(self) -> Params:
        """The params the update trains: the whole model, or under LoRA the adapters."""
        return self.state["params"]

    def merged_params(self) -> Params:
        """The policy as a model without adapters takes it (under LoRA: each adapter folded
        into its weight), e.g. for a Hugging Face export."""
        if not self.lora:
            return self.params
        return jax.jit(lora.merge, static_argnums=0)(self.mdef.spec, self.base, self.params)

    @property
    def step(self) -> int:
        return int(self.state["step"])  # host sync

    @property
    def update_traces(self) -> int:
        """Times the update was traced (each trace is a compile)."""
        return self._update_step.traces

    @property
    def optimizer_steps_per_update(self) -> int:
        """μ × num_minibatches: optimizer steps taken by one `update`."""
        return self.algo.num_iterations * self.algo.num_minibatches

    def uses_layered_update(self) -> bool:
        """Whether `update` runs as per-layer programs (trainer/layered.py): for one optimizer
        step per update on one microbatch, the common GRPO setting, unless the trainer was
        built with layered=False (or, by default, for a model under LAYERED_MIN_PARAMS).
        Everything else (μ > 1, several minibatches, gradient accumulation) runs the
        one-program update (trainer/step.py)."""
        return (self.layered and self.optimizer_steps_per_update == 1
                and self.algo.gradient_accumulation_steps == 1)

    # -- batches ------------------------------------------------------------------------------

    def place_batch(self, batch: TrainBatch) -> TrainBatch:
        """Host arrays -> the trainer mesh, rows split over the "batch" rule's axis."""
        def put(x):
            if x is None:
                return None
            return jax.device_put(np.asarray(x), self._update_step.row_sharding(x))
        return jax.tree.map(put, batch, is_leaf=lambda x: x is None)

    def _group(self, batch: TrainBatch) -> int:
        """G for the shared-prompt forward, or 1 (per-row).

        `batch.group` says the rows come in groups of G that share one prompt; whoever built
        the batch decided that, and the tokens are not compared here. Sharing also needs every
        microbatch to hold whole groups, and prompts of at least `share_min_width` columns:
        the shared forward runs the model twice (prompts, then completions), and for short
        prompts that second pass costs more than the prompt FLOPs it saves.
        """
        g = batch.group
        rows, width = np.shape(batch.prompt_tokens_BxP)
        if g < 1 or rows % g:
            raise ValueError(f"TrainBatch.group={g} with {rows} rows: must be >= 1 and divide "
                             f"the rows (fix: group=1 when rows do not come in whole groups)")
        chunks = self.algo.num_minibatches * self.algo.gradient_accumulation_steps
        if rows % (chunks * g) or width < self.share_min_width:
            return 1
        return g

    # -- memory -------------------------------------------------------------------------------

    def memory_estimate(self, rows: int, prompt_len: int, completion_len: int) -> UpdateMemory:
        """What an update of `rows` rows of prompt_len + completion_len columns holds on one
        trainer device, with the chunk and checkpointing policy it would run with."""
        step = self._update_step
        chunks = self.algo.num_minibatches * self.algo.gradient_accumulation_steps
        local = step.rows_per_device(rows) // chunks if rows % chunks == 0 else \
            step.rows_per_device(rows)
        shapes = TrainBatch(np.zeros((local, prompt_len), np.int32), None,
                            np.zeros((local, completion_len), np.int32), None, None, None)
        plan = step.memory_plan(shapes, rows_per_device=local)

        def device_bytes(tree: Params, shardings: Params) -> int:  # the most one device holds
            return max(per_device_bytes(tree, shardings).values(), default=0)

        trained = device_bytes(self.params, self.shardings)
        frozen = device_bytes(self.base, self.base_shardings) if self.lora else 0
        reference = self.ref_params is not None and self.algo.kl_penalty == "loss"
        return estimate_update(self.mdef.spec, param_bytes=frozen + trained,
                               trained_bytes=trained, reference=reference,
                               rows=local, prompt_len=prompt_len,
                               completion_len=completion_len, plan=plan,
                               device_bytes=self.device_bytes)

    def check_memory(self, rows: int, prompt_len: int, completion_len: int) -> None:
        """Raises trainer.memory.MemoryBudgetError (a ConfigError naming the fields to change)
        when an update of these shapes cannot fit a trainer device, before it compiles."""
        key = (rows, prompt_len, completion_len)
        if key in self._checked_shapes:
            return
        self.memory_estimate(rows, prompt_len, completion_len).check(
            "data.prompts_per_step x sampling.group_size, or algorithm."
            "gradient_accumulation_steps")
        self._checked_shapes.add(key)

    # -- updates and forwards -----------------------------------------------------------------

    def update(self, batch: TrainBatch, *, off_policy: bool = False) -> dict[str, jax.Array]:
        """One GRPO update (μ × num_minibatches optimizer steps); device-side metrics.

        off_policy: the batch was sampled by older weights (async schedule); each token's
        advantage is reweighted by the truncated importance ratio w = min(π_θ/μ, C).
        """
        if self._pretrace_thread is not None:  # let it finish: its trace is this call's
            self._pretrace_thread.join()
            self._pretrace_thread = None
        self.check_memory(*np.shape(batch.prompt_tokens_BxP),
                          np.shape(batch.completion_tokens_BxT)[1])
        flag = jax.device_put(np.bool_(off_policy), self.submesh.replicated())
        update = self._layered_update if self.uses_layered_update() else self._update_step.update
        self.state, aux = update(self.state, self._reference(), self.place_batch(batch), flag,
                                 group=self._group(batch))
        return aux

    def pretrace(self, batch: TrainBatch) -> threading.Thread | None:
        """Traces and lowers the update for `batch`'s shapes on a background thread.

        Tracing the update (Python: seconds for a model of a few layers) and lowering it need
        only the batch's shapes, dtypes and `group`, not its values. The loop calls this with a
        placeholder batch as soon as the first prompts are drawn, so the trace runs while the
        sampler's program compiles (XLA releases the GIL there). JAX keeps the jaxpr and the
        lowering in its caches, keyed by exactly these abstract arguments, so the first
        `update` with the same shapes only compiles. The layered update's programs are traced
        in turn, each for the outputs of the one before (`LayeredUpdate.lower_ahead`). A batch
        of other shapes traces as usual; a failure here is logged and leaves `update` to trace
        by itself. Returns the thread (None if one is already running); `update` waits for it.
        """
        if self._pretrace_thread is not None:
            return None
        group = self._group(batch)

        def abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding)

        b = jax.tree.map(lambda x: abstract(x, self._update_step.row_sharding(x)), batch)
        ref = self.base if self.lora else self.ref_params
        if self.ref_params_host is not None:  # offloaded: trace without copying it in
            ref = jax.tree.map(abstract, self.ref_params_host, self.shardings)
        flag = abstract(np.bool_(False), self.submesh.replicated())
        state = self.state

        def run() -> None:
            try:
                if self.uses_layered_update():
                    layered = self._layered_update
                    layered(state, ref, b, flag, group, run=layered.lower_ahead)
                else:
                    self._update_step.update.trace(state, ref, b, flag, group=group).lower()
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
        return self._update_step.policy_logprobs(self.params, self.base, self.place_batch(batch),
                                                 group=self._group(batch))

    def sequence_kl(self, batch: TrainBatch) -> jax.Array:
        """Σ_t KL_t(π_θ || π_ref) per row with `algorithm.kl_estimator` (for KL in the reward).

        Device array [B]; the caller syncs. Needs the reference model (β > 0).
        """
        if self.ref_params is None and self.ref_params_host is None and not self.lora:
            raise RuntimeError("sequence_kl needs the reference model, which exists only when "
                               "algorithm.beta > 0 (fix: e.g. algorithm.beta=0.02)")
        return self._update_step.sequence_kl(self.params, self._reference(),
                                             self.place_batch(batch), group=self._group(batch))

    def _reference(self) -> Params | None:
        """The update's frozen argument: under LoRA the base; else the reference params on
        the trainer mesh (copied in from the host when offloaded; the copy is freed after the
        step that uses it)."""
        if self.lora:
            return self.base
        if self.ref_params_host is not None:
            return jax.device_put(self.ref_params_host, self.shardings)
        return self.ref_params
