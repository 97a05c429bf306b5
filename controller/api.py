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
graceful stops (`RequestStop`, `job.request_stop()`) after the current step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from controller.config import JobConfig
from controller.metrics import MetricsLog
from controller.status_board import Phase, StatusBoard
from controller.topology import configure_devices
from deploy.pathways import initialize_pathways


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
            from controller.status import start_status_server

            self.status_server = start_status_server(cfg.status, self.board)
        try:
            self._build(cfg)
        except BaseException as e:
            self.board.set_phase(Phase.FAILED, error=f"{type(e).__name__}: {e}")
            self._stop_server()
            raise

    def _build(self, cfg: JobConfig) -> None:
        initialize_pathways()  # no-op unless JAX_PLATFORMS=proxy; must precede jax.devices()
        configure_devices(cfg.topology)  # before anything touches jax.devices()

        from controller.data import build_dataset, build_tokenizer
        from controller.loop import SyncLoop
        from controller.topology import build_meshes
        from reshard.transfer import Resharder
        from rewards.registry import RewardSet
        from sampler.jax_sampler import JaxSampler
        from trainer.model import ModelSpec, define_model, init_params, param_count
        from trainer.optim import build_optimizer
        from trainer.trainer import Trainer

        self.meshes = build_meshes(cfg.topology)
        self.tokenizer = build_tokenizer(cfg)
        self.rewards = RewardSet(cfg.rewards.functions, cfg.rewards.weights)
        spec = ModelSpec.from_config(cfg.model, self.tokenizer.vocab_size)
        self.model_def = define_model(spec)
        params = init_params(spec, cfg.model.init_seed)
        self.num_params = param_count(params)
        self.trainer = Trainer(self.model_def, params, build_optimizer(cfg.optimizer),
                               self.meshes.trainer, cfg.algorithm, cfg.sampling.temperature)
        self.sampler = JaxSampler(self.model_def, self.meshes.sampler, cfg.sampling,
                                  pad_id=self.tokenizer.pad_id,
                                  stop_ids=(self.tokenizer.stop_id,))
        self.dataset = build_dataset(cfg, self.tokenizer)
        self.loop = SyncLoop(cfg, self.tokenizer, self.dataset, self.trainer, self.sampler,
                             Resharder(), self.rewards)
        self.loop.push_weights()  # the sampler starts from the trainer's initial weights
        self.loop.on_phase = self.board.set_phase  # SAMPLING, SCORING, TRAINING, SYNCING
        if self.status_server is not None:
            from controller.status import topology_message

            self.status_server.set_topology(topology_message(
                self.meshes, self.trainer.shardings, self.sampler.shardings,
                self.model_def.shapes(), cfg.topology.backend))
        self.log = MetricsLog(cfg.run.output_dir)
        if cfg.run.output_dir:
            from pathlib import Path

            (Path(cfg.run.output_dir) / "config.yaml").write_text(cfg.to_yaml())
        self.steps_done = 0
        self.board.set_phase(Phase.IDLE)

    @property
    def metrics(self) -> list[dict[str, float]]:
        """Every completed step's metrics, in order."""
        return self.log.history

    @property
    def status_address(self) -> str | None:
        """host:port of the status server, or None when status.enabled is false."""
        return self.status_server.address if self.status_server is not None else None

    @property
    def stop_requested(self) -> bool:
        """True once a graceful stop was asked for (RequestStop); `run()` honours it after the
        current step, and custom loops around `step()` should check it."""
        return self.board.stop_event.is_set()

    def request_stop(self, reason: str = "requested by the API") -> None:
        """Asks `run()` to stop after the current step (what RequestStop does)."""
        self.board.request_stop(reason)

    def set_checkpoint_hook(self, hook: Callable[[int], Any] | None) -> None:
        """Registers `hook(step)`, which saves a checkpoint of the job as of `step`.

        The Job calls it before the next step when a checkpoint was requested
        (RequestCheckpoint), and when a run ends by a graceful stop. Without a hook
        RequestCheckpoint answers FAILED_PRECONDITION ("checkpointing is not configured").
        """
        self.board.checkpoint_hook = hook

    def step(self) -> dict[str, float]:
        """Runs one GRPO step and returns its metrics (a pending checkpoint is taken first)."""
        m = self._step(honor_stop=False)
        assert m is not None
        return m

    def _step(self, honor_stop: bool) -> dict[str, float] | None:
        go, checkpoint_first = self.board.begin_step(honor_stop)
        if not go:
            return None
        if checkpoint_first:
            self._checkpoint(raise_errors=False)
            self.board.set_phase(Phase.SAMPLING)
        try:
            m = self.loop.step(self.steps_done + 1)
        except BaseException as e:
            self.board.set_phase(Phase.FAILED, error=f"step {self.steps_done + 1}: "
                                 f"{type(e).__name__}: {e}")
            raise
        rows = self.config.data.prompts_per_step * self.config.sampling.group_size
        if m.get("time/step_s", 0) > 0 and "completion/len_mean" in m:
            m["throughput/tokens_per_s"] = m["completion/len_mean"] * rows / m["time/step_s"]
        self.steps_done += 1
        self.log.append(m)
        self.board.publish_step(self.steps_done, m, self.loop.weight_pushes - 1)
        return m

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
            import warnings

            warnings.warn(self.board.snapshot.last_error, RuntimeWarning, stacklevel=3)
            return
        self.board.set_phase(Phase.IDLE)

    def run(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        """Runs until `steps` steps (default: run.steps) are done in total, or until a graceful
        stop is requested (RequestStop, `request_stop`): then after the current step."""
        target = steps if steps is not None else self.config.run.steps
        while self.steps_done < target:
            m = self._step(honor_stop=True)
            if m is None:
                break
            if on_step is not None:
                on_step(m)
        stopping = self.stop_requested
        if stopping or self.steps_done >= self.config.run.steps:
            # The run is over: save what was asked for (and, on a graceful stop, the last
            # complete step), then report STOPPED.
            if self.board.take_checkpoint_request() or stopping:
                self._checkpoint(raise_errors=stopping)
            self.board.set_phase(Phase.STOPPED)
        return self.metrics

    def summary(self) -> dict[str, Any]:
        return self.log.summary()

    def close(self) -> None:
        """Closes the metrics file and stops the status server (watch streams drain first)."""
        if not self.board.snapshot.phase.terminal:
            if self.board.take_checkpoint_request():
                self._checkpoint(raise_errors=False)
            self.board.set_phase(Phase.STOPPED)
        self.log.close()
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
