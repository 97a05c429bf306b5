"""The Python controller API.

    from controller.api import Job
    from controller.config import load_config

    with Job(load_config(overrides=["run.steps=20"])) as job:
        metrics = job.step()      # one GRPO step -> {"reward/mean": ..., ...}
        history = job.run()       # the remaining steps
        print(job.summary())

In CPU-proxy simulation (the default) the Job makes JAX's CPU backend expose
`topology.simulated_devices` devices; construct it before any other JAX operation runs.

Unless `status.enabled=false`, the Job also serves the gRPC status service
(controller/status.py) from the moment it is constructed until `close()`; `job.status_address`
says where. The Job publishes its phase and each step's metrics to `job.board`, and honours
graceful stops (RequestStop, SIGTERM, `job.request_stop()`) after the current step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from controller.config import ConfigError, JobConfig, absolute_path, as_path, is_url
from controller.metrics import MetricsLog
from controller.startup import cache_dir_for, configure_compile_cache, initialize_pathways
from controller.status.board import Phase, StatusBoard
from controller.storage import save_hf_model_at, staged_inputs, write_text
from controller.topology import configure_devices

log = logging.getLogger(__name__)


class Job:
    """A GRPO job: meshes, model, trainer, sampler, rewards and the loop that drives them."""

    def __init__(self, config: JobConfig | None = None):
        self.config = cfg = config or JobConfig()
        # STATUS: the board exists from the start; the server (if enabled) starts before the
        # slow part, so operators can see the job while it builds and compiles.
        self.board = StatusBoard(
            job_id=f"{cfg.run.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
            run_name=cfg.run.name, config_digest=cfg.digest(), total_steps=cfg.run.steps,
            history=cfg.status.history)
        self.status_server = None
        if cfg.status.enabled:
            from controller.status.server import start_status_server

            self.status_server = start_status_server(cfg.status, self.board)
        # What a failed step left behind (see `_keep_progress`); None while no step failed.
        self.failure: StepFailure | None = None
        try:
            self._build(cfg)
        except BaseException as e:
            self.board.set_phase(Phase.FAILED, error=f"{type(e).__name__}: {e}")
            if "rewards" in vars(self):  # reward workers may already be running
                self.rewards.close()
            self._stop_server()
            raise

    def _build(self, cfg: JobConfig) -> None:
        # No-op unless JAX_PLATFORMS=proxy; must precede anything that touches jax.devices().
        self.pathways = initialize_pathways(cfg.topology.backend)
        configure_devices(cfg.topology)  # before anything touches jax.devices()
        cache_dir = cache_dir_for(cfg.run.compile_cache_dir, on_pathways=self.pathways is not None)
        self.compile_cache_dir = configure_compile_cache(
            absolute_path(cache_dir) if cache_dir else None)  # JAX keeps it for the process

        from controller.data import build_dataset, build_tokenizer
        from rewards.registry import RewardSet

        # INPUTS: what the user's files and names give (the HF config, the tokenizer, the
        # prompts, the reward functions) is read before any mesh, parameter or program, so a
        # bad one fails in seconds. Nothing here draws random numbers.
        # A gs:// model.path or data.path is copied to a local cache first; `local` names the
        # copies, `cfg` stays as the user wrote it (its digest, config.yaml, checkpoints).
        local = staged_inputs(cfg)
        self.model_dir = local.model.path
        self._base_digest: str | None = None  # see _base_fingerprint
        self._init_digest: str | None = None  # SHA-256 of model.init_from's weights
        hf_spec = None
        if self.model_dir:
            from trainer.hf import load_hf_spec

            hf_spec = load_hf_spec(self.model_dir, cfg.model.dtype)
        self.tokenizer = build_tokenizer(local)
        self.dataset = build_dataset(local, self.tokenizer)
        if hf_spec is not None and self.tokenizer.vocab_size > hf_spec.vocab_size:
            raise ConfigError(
                f"model.path={cfg.model.path!r}: the tokenizer has {self.tokenizer.vocab_size} "
                f"ids but the model only {hf_spec.vocab_size} embeddings (fix: use the "
                f"tokenizer that belongs to this checkpoint)")
        self.rewards = RewardSet.from_config(cfg.rewards)  # may start worker processes

        from controller.loop import build_loop
        from controller.timeline import Timeline
        from controller.topology import build_meshes
        from reshard.transfer import Resharder
        from sampler.factory import build_sampler
        from trainer.model import (
            ModelSpec,
            define_model,
            init_params,
            param_count,
            param_shardings,
        )
        from trainer.optim import build_optimizer, build_schedule
        from trainer.trainer import Trainer

        self.meshes = build_meshes(cfg.topology, colocated=cfg.schedule.kind == "colocated")
        if hf_spec is not None:
            # A Hugging Face checkpoint, read straight into the trainer's sharding.
            from trainer.hf import load_hf_params

            spec = hf_spec
            self.model_def = define_model(spec)
            params = load_hf_params(self.model_dir, self.model_def,
                                    shardings=param_shardings(self.model_def, self.meshes.trainer))
        else:
            spec = ModelSpec.from_config(cfg.model, self.tokenizer.vocab_size)
            self.model_def = define_model(spec)
            params = init_params(spec, cfg.model.init_seed)
        if cfg.model.init_from is not None:
            params = self._initial_weights(cfg.model.init_from)
        self.num_params = param_count(params)
        # model_def: the model as Hugging Face and the checkpoints of full fine-tuning know it;
        # policy_def: what the trainer runs (with LoRA, the model with adapters);
        # sampler_def: what the sampler runs (with LoRA's "unmerged" sampler, the adapters too).
        self.policy_def = self.sampler_def = self.model_def
        adapters = None
        if cfg.model.lora is not None:
            from trainer import lora

            self.policy_def = define_model(lora.configured(spec, cfg.model.lora))
            adapters = lora.init_adapters(self.policy_def.shapes(), cfg.model.init_seed)
            if cfg.model.lora.sampler == "unmerged" and cfg.sampling.backend != "vllm":
                self.sampler_def = self.policy_def
        # η(s) over optimizer steps: μ × num_minibatches per GRPO step.
        schedule = build_schedule(cfg.optimizer, cfg.run.steps * cfg.algorithm.num_iterations
                                  * cfg.algorithm.num_minibatches)
        self.trainer = Trainer(self.policy_def, params, build_optimizer(cfg.optimizer, schedule),
                               self.meshes.trainer, cfg.algorithm, cfg.sampling.temperature,
                               lr_schedule=schedule, is_cap=cfg.schedule.is_cap,
                               memory=cfg.trainer, adapters=adapters, seed=cfg.run.seed)
        # The completions alone (prompt widths come with the data) must fit before any rollout.
        self.trainer.check_memory(cfg.data.prompts_per_step * cfg.sampling.group_size, 0,
                                  cfg.completion_tokens)
        hf_dir, to_hf = None, None
        if cfg.model.path and cfg.sampling.backend == "vllm":
            # vLLM serves the HF directory and takes each new policy by HF tensor name.
            from trainer.hf import hf_named_arrays

            hf_dir, to_hf = self.model_dir, lambda p: hf_named_arrays(self.model_def.spec, p)
        self.sampler = build_sampler(cfg.sampling, self.sampler_def, self.meshes.sampler,
                                     pad_id=self.tokenizer.pad_id,
                                     stop_ids=tuple(self.tokenizer.stop_ids),
                                     param_dtype=cfg.reshard.dtype,
                                     hf_model_dir=hf_dir, to_hf=to_hf)
        self.evaluator = None
        if cfg.eval_enabled:
            from controller.eval.evaluator import Evaluator

            # Its own sampler on the sampler mesh, fed the training sampler's weights.
            self.evaluator = Evaluator(local, self.tokenizer, self.rewards, self.sampler_def,
                                       self.meshes.sampler, param_dtype=cfg.reshard.dtype)
        # (step evaluated, metrics) of every evaluation so far; listeners hear each one.
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.eval_listeners: list[Callable[[int, dict[str, float]], Any]] = []
        self.timeline = Timeline()
        resharder = Resharder(dtype=cfg.reshard.dtype, chunk_bytes=cfg.reshard.chunk_bytes,
                              donate=cfg.reshard.donate, method=cfg.reshard.method)
        self.loop = build_loop(cfg, self.tokenizer, self.dataset, self.trainer, self.sampler,
                               resharder, self.rewards, timeline=self.timeline)
        self.steps_done = 0
        self.resumed_from: int | None = None
        self.checkpointer = self._open_checkpoints()
        if self.checkpointer is not None:  # RequestCheckpoint / request_checkpoint() save here
            self.set_checkpoint_hook(lambda step: self.save_checkpoint())
        # Phases on the status board follow the timeline: each span's start is a phase change
        # (with the async schedule both threads report, and the latest wins).
        self.timeline.on_span_start = self._on_span_start
        # The sampler starts from the trainer's weights (initial, or just restored).
        self.loop.start(resumed_version=self.steps_done)
        self.log = MetricsLog(cfg.run.output_dir, resume_step=self.resumed_from,
                              sinks=self._extra_sinks())
        if cfg.run.output_dir:
            write_text(as_path(cfg.run.output_dir) / "config.yaml", cfg.to_yaml())
        if self.status_server is not None:
            from controller.status.server import topology_message
            from trainer.model import param_shardings

            # Every param the trainer holds (with LoRA the base and the adapters), and its
            # layout on the sampler's devices (none for vLLM, which places weights itself).
            self.status_server.set_topology(topology_message(
                self.meshes, param_shardings(self.policy_def, self.meshes.trainer),
                param_shardings(self.policy_def, self.meshes.sampler)
                if self.sampler.shardings is not None else None,
                self.policy_def.shapes(), cfg.topology.backend))
        self.board.set_phase(Phase.IDLE)

    _PHASES: ClassVar[dict[str, Phase]] = {
        "sample": Phase.SAMPLING, "score": Phase.SCORING, "update": Phase.TRAINING,
        "reshard": Phase.SYNCING}

    def _on_span_start(self, phase: str, mesh: str, step: int) -> None:
        if phase in self._PHASES and step > 0 and not self.board.snapshot.phase.terminal:
            self.board.set_phase(self._PHASES[phase])

    @property
    def status_address(self) -> str | None:
        """host:port of the status server, or None when status.enabled is false."""
        return self.status_server.address if self.status_server is not None else None

    def set_checkpoint_hook(self, hook: Callable[[int], Any] | None) -> None:
        """Registers `hook(step)`, which saves a checkpoint as of `step` (RequestCheckpoint).

        A job with a checkpoint directory registers its orbax checkpointer here itself.
        """
        self.board.checkpoint_hook = hook

    def _extra_sinks(self) -> list[Any]:
        from controller.metrics import TensorBoardSink, WandbSink

        cfg, sinks = self.config, []
        if cfg.run.tensorboard:
            if not cfg.run.output_dir:
                raise ConfigError("run.tensorboard=true needs run.output_dir (fix: e.g. "
                                  "run.output_dir=runs/my-run)")
            sinks.append(TensorBoardSink(as_path(cfg.run.output_dir) / "tensorboard"))
        if cfg.run.wandb_project:
            # W&B keeps its files in a local directory: its default when the output is a bucket.
            local_dir = None if is_url(cfg.run.output_dir) else cfg.run.output_dir
            sinks.append(WandbSink(cfg.run.wandb_project, cfg.run.name,
                                   cfg.model_dump(mode="json"), local_dir))
        return sinks

    # -- checkpoints -----------------------------------------------------------------------

    def _open_checkpoints(self) -> Any:
        """Opens the checkpoint directory; on run.resume restores the newest good checkpoint."""
        cfg = self.config
        directory = cfg.checkpoint_dir
        if directory is None:
            if cfg.run.resume:
                raise ConfigError(
                    "run.resume=true but there is no checkpoint directory (fix: set "
                    "run.output_dir or checkpoint.dir to the run to resume)")
            return None
        from trainer.checkpoint import Checkpointer, abstract_like

        field = "checkpoint.dir" if cfg.checkpoint.dir else "run.output_dir"
        value = cfg.checkpoint.dir or cfg.run.output_dir
        if cfg.run.resume and not as_path(directory).is_dir():
            raise ConfigError(
                f"run.resume=true but {field}={value!r} holds no checkpoint to resume "
                f"({directory} does not exist) (fix: drop run.resume=true to start a new run "
                f"there, or set {field} to the run to continue)")
        ckpt = Checkpointer(directory, keep_last=cfg.checkpoint.keep_last,
                            async_save=cfg.checkpoint.async_save)
        metrics_file = as_path(cfg.run.output_dir or directory) / "metrics.jsonl"
        if not cfg.run.resume:
            if ckpt.steps() or (metrics_file.exists() and metrics_file.stat().length):
                raise ConfigError(
                    f"{directory} already holds a run (checkpoints {ckpt.steps()}); nothing is "
                    f"overwritten (fix: run.resume=true to continue it, or a new "
                    f"run.output_dir)")
            return ckpt
        had = ckpt.steps()
        try:
            self._check_lora_base(ckpt)
        except ConfigError:
            ckpt.close()
            raise
        found = ckpt.restore_latest(abstract_like(self.trainer.state))
        if found is None:
            ckpt.close()
            why = (f"none of its checkpoints {had} restores (each was moved to "
                   f"{directory}/corrupt-<step>)" if had else f"{directory} has none")
            raise ConfigError(
                f"run.resume=true but {field}={value!r} holds no checkpoint to resume ({why}) "
                f"(fix: drop run.resume=true to start a new run there, or set {field} to the "
                f"run to continue)")
        _, state, meta = found
        self.trainer.restore_state(state)
        self.dataset.position = int(meta["data_position"])
        self.steps_done = self.resumed_from = int(meta["step"])
        return ckpt

    def _checkpoint_meta(self) -> dict[str, Any]:
        import jax

        return {
            "step": self.steps_done,
            "policy_version": self.loop.policy_version,
            # Rows behind the last trained batch: an async sampler may have drawn more, and
            # those batches are sampled again after a resume.
            "data_position": self.loop.consumed_position,
            # Sampling keys are fold_in(key(run.seed), step): the seed and step are the state.
            "rng": {"seed": self.config.run.seed,
                    "key_data": jax.random.key_data(self.loop.rng).tolist()},
            "config": self.config.model_dump(mode="json"),
            "config_digest": self.config.digest(),
            **({"lora_base": self._base_fingerprint()} if self.trainer.lora else {}),
        }

    def _initial_weights(self, init_from: str) -> Any:
        """The policy of the newest restorable full fine-tuning checkpoint under `init_from`
        (model.init_from), checked against this job's model; host arrays."""
        import jax
        import numpy as np

        from controller.cli.export import (
            ExportError,
            check_shapes,
            find_step_dirs,
            read_meta,
            restore_params,
        )

        field = f"model.init_from={init_from!r}"
        try:
            step_dirs = find_step_dirs(init_from)
        except ExportError as e:
            raise ConfigError(f"{field}: {e}") from None
        why = []
        for step_dir in step_dirs:
            try:
                meta = read_meta(step_dir)
                if "lora_base" in meta:
                    raise ConfigError(
                        f"{field}: {step_dir} holds LoRA adapters, not a whole model (fix: "
                        f"`tandem export {init_from} DIR --merge`, then model.path=DIR)")
                check_shapes(step_dir, self.model_def.shapes())
                params = restore_params(step_dir, self.model_def.shapes())
            except ExportError as e:
                why.append(str(e))
                continue
            digest = hashlib.sha256()
            for leaf in jax.tree.leaves(jax.device_get(params)):
                digest.update(np.ascontiguousarray(leaf).tobytes())
            self._init_digest = digest.hexdigest()
            log.info("initial weights: the checkpoint of step %s in %s", step_dir.name,
                     step_dir.parent)
            return params
        raise ConfigError(f"{field}: no checkpoint there fits this model ({'; '.join(why)}) "
                          f"(fix: point it at a full fine-tuning run of the same model.* "
                          f"settings)")

    def _base_fingerprint(self) -> str:
        """What a LoRA run's adapters were trained on: a SHA-256 of model.path's weight files,
        or of the model section that seeds the built-in model. Computed once."""
        if self._base_digest is None:
            h = hashlib.sha256()
            if self._init_digest is not None:  # model.init_from: the weights themselves
                h.update(self._init_digest.encode())
            elif self.model_dir is not None:
                for f in sorted(Path(self.model_dir).glob("*.safetensors")):
                    h.update(f.name.encode())
                    with f.open("rb") as fh:
                        while block := fh.read(1 << 22):
                            h.update(block)
            else:
                model = self.config.model.model_dump(mode="json",
                                                     exclude={"lora", "init_from"})
                h.update(json.dumps(model, sort_keys=True).encode())
            self._base_digest = f"sha256:{h.hexdigest()}"
        return self._base_digest

    def _check_lora_base(self, ckpt: Any) -> None:
        """A resume must train what the checkpoint trained: adapters on the same base, or the
        whole model. Checked from the newest checkpoint's record, before any restore (a
        mismatch there is a config error, not a corrupt checkpoint)."""
        from controller.cli.export import ExportError, read_meta

        steps = ckpt.steps()
        if not steps:
            return
        try:
            meta = read_meta(as_path(ckpt.directory) / str(steps[-1]))
        except ExportError:
            return  # an unreadable newest checkpoint: restore_latest sets it aside
        saved = meta.get("lora_base")
        if self.trainer.lora and saved is None:
            raise ConfigError(
                f"model.lora is set but the checkpoint in {ckpt.directory} (step {steps[-1]}) "
                f"trained the whole model (fix: resume without model.lora, or start a new "
                f"run.output_dir)")
        if not self.trainer.lora and saved is not None:
            raise ConfigError(
                f"the checkpoint in {ckpt.directory} (step {steps[-1]}) holds LoRA adapters but "
                f"model.lora is unset (fix: resume with the run's model.lora settings)")
        if saved is not None and saved != self._base_fingerprint():
            where = f"model.path={self.config.model.path!r}" if self.config.model.path else \
                "the built-in model section"
            raise ConfigError(
                f"the adapters in {ckpt.directory} (step {steps[-1]}) were trained on another "
                f"base model than {where} ({saved[:19]}... vs "
                f"{self._base_fingerprint()[:19]}...) (fix: point model.path at the base the run "
                f"started from)")

    def save_checkpoint(self, *, wait: bool = False) -> bool:
        """Saves the current state (asynchronously unless `wait`). False if not configured."""
        if self.checkpointer is None:
            return False
        if self.checkpointer.steps()[-1:] == [self.steps_done]:
            return True  # this step is already saved
        # Metrics first: a run resumed from this checkpoint finds every step up to it logged
        # (a bucket's metrics.jsonl is uploaded in batches).
        self.log.flush()
        self.checkpointer.save(self.steps_done, self.trainer.state, self._checkpoint_meta(),
                               wait=wait)
        return True

    def _keep_progress(self, state_before: Any) -> StepFailure:
        """After step steps_done + 1 failed: saves the checkpoint of the last completed step
        (when checkpointing is on and the trainer state is still that step's), and says what
        was kept. Never raises: the step's own error is the one to report."""
        import jax

        failed = self.steps_done + 1
        directory = self.config.checkpoint_dir
        if self.checkpointer is None:
            return StepFailure(failed, None, None, "checkpointing is off (set run.output_dir "
                               "or checkpoint.dir to keep a run's progress)")
        if self.steps_done == 0 or self.steps_done == self.resumed_from:
            kept = self.checkpointer.steps()[-1:]
            return StepFailure(failed, kept[0] if kept else None, directory,
                               "no step completed in this run, so there is nothing new to save")
        # The state is still the last completed step's unless the failure came after the
        # update had begun (then it may be half-updated, or its buffers donated).
        intact = (self.trainer.state is state_before
                  and self.loop.policy_version == self.steps_done
                  and not any(isinstance(x, jax.Array) and x.is_deleted()
                              for x in jax.tree.leaves(state_before)))
        if not intact:
            kept = self.checkpointer.steps()[-1:]
            return StepFailure(failed, kept[0] if kept else None, directory,
                               "the failure came during the update, so the trainer state is "
                               "not the last completed step's and was not saved")
        try:
            self.save_checkpoint(wait=True)
        except Exception as e:  # e.g. a full disk: report it beside the step's own error
            kept = [s for s in self.checkpointer.steps() if s != self.steps_done][-1:]
            return StepFailure(failed, kept[0] if kept else None, directory,
                               f"saving step {self.steps_done} failed "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return StepFailure(failed, self.steps_done, directory, None)

    def request_checkpoint(self) -> tuple[bool, int, str]:
        """Asks for a checkpoint after the current step (safe from any thread)."""
        return self.board.request_checkpoint()

    def request_stop(self, reason: str = "requested by the API") -> tuple[bool, int, str]:
        """Asks `run()` to stop after the current step, with a checkpoint (any thread)."""
        return self.board.request_stop(reason)

    @property
    def stop_requested(self) -> bool:
        """True once a graceful stop was asked for; `run()` honours it after the current
        step, and custom loops around `step()` should check it."""
        return self.board.stop_event.is_set()

    def _checkpoint(self, raise_errors: bool) -> None:
        hook = self.board.checkpoint_hook
        if hook is None:
            return
        self.board.set_phase(Phase.CHECKPOINTING)
        try:
            hook(self.steps_done)
        except Exception as e:
            self.board.set_phase(Phase.IDLE, error=f"checkpoint after step {self.steps_done} "
                                 f"failed: {type(e).__name__}: {e}")
            if raise_errors:
                raise
            log.warning("%s", self.board.snapshot.last_error)
            return
        self.board.set_phase(Phase.IDLE)

    @property
    def metrics(self) -> list[dict[str, float]]:
        """Every completed step's metrics, in order."""
        return self.log.history

    def step(self) -> dict[str, float]:
        """Runs one GRPO step and returns its metrics (a pending checkpoint is taken first)."""
        m = self._step(honor_stop=False)
        assert m is not None
        return m

    def evaluate(self) -> dict[str, float]:
        """Evaluates the weights the sampler holds now on the held-out prompts (see
        controller/eval/evaluator.py) and returns the `eval/...` metrics. Also publishes them
        to the status service and the listeners, and appends the completions to
        <run.output_dir>/eval_samples.jsonl. Training's state and randomness are untouched."""
        if self.evaluator is None:
            raise ConfigError("evaluation is off (fix: eval.enabled=true)")
        params, version = self.loop.sampler_weights()
        step = self.steps_done
        with self.timeline.span("eval", "sampler", step):
            result = self.evaluator.run(params)
        m = {**result.metrics, "eval/policy_version": float(version)}
        self.evals.append((step, m))
        self.log.write_records("eval_samples.jsonl", [{"step": step, **r}
                                                      for r in result.records])
        self.board.publish_eval(step, m)
        for listener in self.eval_listeners:
            listener(step, m)
        return m

    def _eval_due(self) -> bool:
        """After this step: every eval.every_steps, and after the last step of the run."""
        if self.evaluator is None:
            return False
        every = self.config.eval.every_steps
        return (bool(every) and self.steps_done % every == 0) or (
            self.steps_done == self.config.run.steps)

    def _step(self, honor_stop: bool) -> dict[str, float] | None:
        go, checkpoint_first = self.board.begin_step(honor_stop)
        if not go:
            return None
        if self.evaluator is not None and self.steps_done == 0 and not self.evals:
            # The baseline, before any update: a row of its own at step 0.
            self.log.append_eval(0, self.evaluate())
        if checkpoint_first:
            self._checkpoint(raise_errors=False)
            self.board.set_phase(Phase.SAMPLING)
        state_before = self.trainer.state
        try:
            m = self.loop.step(self.steps_done + 1)
        except BaseException as e:
            self.board.set_phase(Phase.FAILED, error=f"step {self.steps_done + 1}: "
                                 f"{type(e).__name__}: {e}")
            if isinstance(e, Exception):  # not a second Ctrl-C: keep what was done
                self.failure = self._keep_progress(state_before)
            raise
        if m.get("time/step_s", 0) > 0 and "completion/tokens" in m:
            m["throughput/tokens_per_s"] = m["completion/tokens"] / m["time/step_s"]
        self.steps_done += 1
        if self._eval_due():  # before the row is logged and the checkpoint saved: a resume
            m.update(self.evaluate())  # repeats a step together with its evaluation
        self.log.append(m)
        if self.loop.sample_log:
            self.log.write_records("samples.jsonl", self.loop.sample_log)
            self.loop.sample_log = []
        every = self.config.checkpoint.every_steps
        if every and self.steps_done % every == 0:
            self.save_checkpoint()  # asynchronous: returns once the arrays are off the devices
        self.board.publish_step(self.steps_done, m, self.loop.policy_version)
        return m

    def run(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        """Runs until `steps` steps (default: run.steps) are done in total."""
        target = steps if steps is not None else self.config.run.steps
        with _graceful_signals(self):
            while self.steps_done < target:
                m = self._step(honor_stop=True)
                if m is None:
                    break
                if on_step is not None:
                    on_step(m)
        stopping = self.stop_requested
        if self.board.take_checkpoint_request() or stopping:
            self._checkpoint(raise_errors=stopping)
        # The end of a run, or a stop: a complete checkpoint of where it got to.
        self.save_checkpoint(wait=True)
        if stopping or self.steps_done >= self.config.run.steps:
            self.board.set_phase(Phase.STOPPED)
        return self.metrics

    def save_hf_model(self, path: str, *, max_shard_bytes: int = 4 * 1024**3,
                      overwrite: bool = False) -> Any:
        """Writes the current policy as a Hugging Face directory (config, safetensors shards,
        and, when the job started from model.path, its tokenizer and generation files)."""
        return save_hf_model_at(path, self.model_def.spec, self.trainer.merged_params(),
                                source_dir=self.model_dir, max_shard_bytes=max_shard_bytes,
                                overwrite=overwrite)

    def summary(self) -> dict[str, Any]:
        """First vs last reward, step time, sync bandwidth, and the timeline's busy/idle/overlap
        fractions per mesh (from step 2 on: step 1 is mostly compilation)."""
        return {**self.log.summary(), **self.timeline.summary(since_step=2)}

    def close(self) -> None:
        """Stops the sampler thread (async), waits for saves, closes sinks, stops the status
        server (watch streams drain first); idempotent."""
        if not self.board.snapshot.phase.terminal:
            if self.board.take_checkpoint_request():
                self._checkpoint(raise_errors=False)
            self.board.set_phase(Phase.STOPPED)
        self.loop.close()
        if self.config.run.output_dir and self.timeline.spans:
            self.timeline.write_chrome_trace(as_path(self.config.run.output_dir) / "trace.json")
        if self.checkpointer is not None:
            self.checkpointer.close()  # waits for background saves to finish
            self.checkpointer = None
        self.log.close()
        self.rewards.close()  # stops reward worker processes / Ray actors
        self._stop_server()

    def _stop_server(self) -> None:
        self.board.close()
        if self.status_server is not None:
            self.status_server.stop()
            self.status_server = None

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None and not self.board.snapshot.phase.terminal:
            self.board.set_phase(Phase.FAILED, error=f"{exc_type.__name__}: {exc}")
        self.close()


@dataclasses.dataclass(frozen=True)
class StepFailure:
    """What a failed step left behind: the step that failed, the newest checkpoint on disk
    (`saved_step` in `directory`, None if there is none) and, if the last completed step could
    not be saved, why not."""

    step: int
    saved_step: int | None
    directory: str | None
    not_saved: str | None


@contextlib.contextmanager
def _graceful_signals(job: Job) -> Iterator[None]:
    """SIGTERM / SIGINT ask the job to stop after the current step (and save); a second
    SIGINT interrupts at once. Cluster preemption sends SIGTERM first, so this is the path
    that keeps a preempted run's progress."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and job.stop_requested:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        log.warning("%s: stopping after the current step", name)
        job.request_stop(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
